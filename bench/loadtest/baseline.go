package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// serveBaseline is the baseline the plugin is compared with: a bare
// net/http server in a process of its own that reads each request's body
// and answers a fixed JSON, byte for byte the size of the plugin's answer.
// It is the load tool's own binary, started as `loadtest baseline`.
func serveBaseline(args []string) error {
	fs := flag.NewFlagSet("loadtest baseline", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to serve on")
	answerFile := fs.String("answer", "", "file holding the answer to send")
	if err := fs.Parse(args); err != nil {
		return err
	}
	answer, err := os.ReadFile(*answerFile)
	if err != nil {
		return err
	}
	length := strconv.Itoa(len(answer))
	bufs := sync.Pool{New: func() any { return new(bytes.Buffer) }}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /port-registrations", func(w http.ResponseWriter, r *http.Request) {
		buf := bufs.Get().(*bytes.Buffer)
		buf.Reset()
		_, err := buf.ReadFrom(r.Body)
		bufs.Put(buf)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		h := w.Header()
		h.Set("Content-Type", "application/json")
		h.Set("Content-Length", length)
		w.WriteHeader(http.StatusOK)
		w.Write(answer)
	})
	mux.HandleFunc("GET /ping", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("pong")) })
	srv := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
		<-sig
		srv.Close()
	}()
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("baseline: %v", err)
	}
	return nil
}

// startBaseline runs `self baseline` with answer and waits for it to answer.
func startBaseline(self, dir string, answer []byte) (*proc, string, error) {
	answerPath := dir + "/baseline-answer.json"
	if err := os.WriteFile(answerPath, answer, 0o600); err != nil {
		return nil, "", err
	}
	port, err := freePort()
	if err != nil {
		return nil, "", err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	p, err := startProc("baseline", dir+"/baseline.log", self, "baseline", "-listen", addr, "-answer", answerPath)
	if err != nil {
		return nil, "", err
	}
	if _, err := waitHTTP(p, "http://"+addr+"/ping", 5*time.Millisecond, 30*time.Second, nil); err != nil {
		p.stop(syscall.SIGKILL)
		return nil, "", err
	}
	return p, addr, nil
}
