package main

import (
	"io"
	"sync"
)

// batchWriter hands log lines to a goroutine that writes them in batches.
// A reconnect storm logs one line per request; written one by one, those
// lines cost a system call each on frps's critical path. Nothing waits on
// a timer: under light load each line goes out at once, under heavy load
// lines pile up while the previous batch is written. close flushes the rest.
type batchWriter struct {
	out     io.Writer
	writeMu sync.Mutex // held while writing to out, so batches keep their order
	mu      sync.Mutex // guards buf and closed
	buf     []byte
	closed  bool // after close, lines are written in line
	wake    chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

// maxLogBacklog bounds what may wait in memory; past it writers wait.
const maxLogBacklog = 1 << 20

func newBatchWriter(out io.Writer) *batchWriter {
	w := &batchWriter{out: out, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go w.loop()
	return w
}

func (w *batchWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	if w.closed {
		defer w.mu.Unlock()
		return w.out.Write(p)
	}
	if len(w.buf) > maxLogBacklog { // the writer cannot keep up: wait for it
		w.mu.Unlock()
		w.sync()
		w.mu.Lock()
	}
	w.buf = append(w.buf, p...)
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
	return len(p), nil
}

func (w *batchWriter) loop() {
	defer close(w.done)
	var batch []byte
	for {
		select {
		case <-w.wake:
		case <-w.stop:
			return
		}
		w.writeMu.Lock()
		w.mu.Lock()
		batch, w.buf = w.buf, batch[:0]
		w.mu.Unlock()
		if len(batch) > 0 {
			w.out.Write(batch)
		}
		w.writeMu.Unlock()
	}
}

// sync writes every line logged so far before it returns.
func (w *batchWriter) sync() {
	w.writeMu.Lock()
	defer w.writeMu.Unlock()
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) > 0 {
		w.out.Write(w.buf)
		w.buf = w.buf[:0]
	}
}

// close writes what is left and stops the goroutine.
func (w *batchWriter) close() {
	close(w.stop)
	<-w.done
	w.sync()
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
}
