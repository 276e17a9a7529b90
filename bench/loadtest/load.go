package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// pluginPath and the query are what frps sends to a plugin.
const pluginQuery = "/port-registrations?version=0.1.0&op=NewProxy"

// newProxyBody is a NewProxy request as in the issue:
// {"version":"0.1.0","op":"NewProxy","content":{"user":{...},"proxy_name":...,"proxy_type":"tcp"}}
func newProxyBody(user, name string) []byte {
	return fmt.Appendf(nil, `{"version":"0.1.0","op":"NewProxy","content":{"user":{"user":%q,"metas":null,"run_id":"r"},"proxy_name":%q,"proxy_type":"tcp"}}`, user, name)
}

// loadResult is what one burst of requests measured.
type loadResult struct {
	Requests int     `json:"requests"`
	Conns    int     `json:"conns"`
	Dials    int64   `json:"dials"`             // TCP connections opened, warm-up included
	Retries  int64   `json:"retries,omitempty"` // requests sent again because retry said so
	Seconds  float64 `json:"seconds"`
	RPS      float64 `json:"rps"`
	P50      float64 `json:"p50_ms"`
	P90      float64 `json:"p90_ms"`
	P99      float64 `json:"p99_ms"`
	P999     float64 `json:"p999_ms"`
	Max      float64 `json:"max_ms"`
}

// load describes one burst: total requests over conns connections, each
// connection driven by a goroutine of its own, request i carrying
// bodies[i%len(bodies)]. check sees every answer.
type load struct {
	url    string
	bodies [][]byte
	total  int
	conns  int
	warmup int // untimed requests per connection before the burst
	// rate, when > 0, paces the burst: request i is sent no earlier than
	// i/rate seconds after the start (an open loop at that rate, as long
	// as the server keeps up); 0 sends each request as soon as the
	// connection's previous answer is in (a closed loop).
	rate  float64
	check func(i int, status int, body []byte) error
	// retry, when set, may ask for a request to be sent again (at most 10
	// times, 50 ms apart), as frpc would after a "try again" rejection.
	// Only the last attempt's latency counts.
	retry func(status int, body []byte) bool
}

// run sends the burst. Connections are opened and warmed first; the clock
// runs from the moment every connection is ready to the last answer.
func (l load) run() (loadResult, error) {
	var dials, retries atomic.Int64
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	clients := make([]*http.Client, l.conns)
	for i := range clients {
		clients[i] = &http.Client{
			Timeout: 30 * time.Second,
			Transport: &http.Transport{
				// One transport per goroutine: each goroutine keeps its own
				// keep-alive connection for the whole burst.
				MaxIdleConns:        l.conns,
				MaxIdleConnsPerHost: l.conns,
				MaxConnsPerHost:     1,
				IdleConnTimeout:     5 * time.Minute,
				DisableCompression:  true,
				DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
					dials.Add(1)
					return dialer.DialContext(ctx, network, addr)
				},
			},
		}
	}
	defer func() {
		for _, c := range clients {
			c.CloseIdleConnections()
		}
	}()

	var errs errorCounter
	var next atomic.Int64
	lat := make([][]time.Duration, l.conns)
	var ready, done sync.WaitGroup
	start := make(chan struct{})
	var t0 time.Time // set before start is closed
	for w := range l.conns {
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			c := clients[w]
			var buf bytes.Buffer
			send := func(body []byte) (int, error) {
				req, err := http.NewRequest(http.MethodPost, l.url, bytes.NewReader(body))
				if err != nil {
					return 0, err
				}
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("X-Frp-Reqid", "loadtest")
				resp, err := c.Do(req)
				if err != nil {
					return 0, err
				}
				buf.Reset()
				_, err = buf.ReadFrom(resp.Body)
				resp.Body.Close()
				return resp.StatusCode, err
			}
			for k := range l.warmup {
				body := l.bodies[(w*l.warmup+k)%len(l.bodies)]
				if status, err := send(body); err != nil || status != http.StatusOK {
					errs.add(fmt.Errorf("warm-up: status %d, %v", status, err))
				}
			}
			ready.Done()
			<-start
			mine := make([]time.Duration, 0, l.total/l.conns+1)
			for {
				i := int(next.Add(1) - 1)
				if i >= l.total {
					break
				}
				if l.rate > 0 {
					at := t0.Add(time.Duration(float64(i) / l.rate * float64(time.Second)))
					if wait := time.Until(at); wait > 0 {
						time.Sleep(wait)
					}
				}
				var status int
				var err error
				var d time.Duration
				for attempt := 1; ; attempt++ {
					t := time.Now()
					status, err = send(l.bodies[i%len(l.bodies)])
					d = time.Since(t)
					if err != nil || l.retry == nil || attempt > 10 || !l.retry(status, buf.Bytes()) {
						break
					}
					retries.Add(1)
					time.Sleep(50 * time.Millisecond)
				}
				if err != nil {
					errs.add(err)
					continue
				}
				mine = append(mine, d)
				if l.check != nil {
					if err := l.check(i, status, buf.Bytes()); err != nil {
						errs.add(err)
					}
				} else if status != http.StatusOK {
					errs.add(fmt.Errorf("status %d: %s", status, buf.Bytes()))
				}
			}
			lat[w] = mine
		}()
	}
	ready.Wait()
	t0 = time.Now()
	close(start)
	done.Wait()
	elapsed := time.Since(t0)
	if err := errs.err(); err != nil {
		return loadResult{}, err
	}
	all := slices.Concat(lat...)
	r := summarize(all, elapsed)
	r.Conns, r.Dials, r.Retries = l.conns, dials.Load(), retries.Load()
	return r, nil
}

// summarize turns latencies into a result; elapsed is the burst's wall time.
func summarize(all []time.Duration, elapsed time.Duration) loadResult {
	slices.Sort(all)
	r := loadResult{Requests: len(all), Seconds: elapsed.Seconds()}
	if len(all) == 0 {
		return r
	}
	r.RPS = float64(len(all)) / elapsed.Seconds()
	r.P50, r.P90, r.P99, r.P999 = pct(all, 50), pct(all, 90), pct(all, 99), pct(all, 99.9)
	r.Max = ms(all[len(all)-1])
	return r
}

// pct is the nearest-rank percentile of sorted latencies, in milliseconds.
func pct(sorted []time.Duration, p float64) float64 {
	rank := int(float64(len(sorted))*p/100+0.999999) - 1
	rank = max(0, min(rank, len(sorted)-1))
	return ms(sorted[rank])
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// portSuffix is how an allowing answer for port ends.
func portSuffix(port int) []byte { return fmt.Appendf(nil, `"remote_port":%d}}`, port) }

// answerPort reads remote_port from the end of an allowing answer.
func answerPort(body []byte) (int, bool) {
	const marker = `"remote_port":`
	i := bytes.LastIndex(body, []byte(marker))
	if i < 0 || !bytes.HasSuffix(body, []byte("}}")) {
		return 0, false
	}
	n, err := strconv.Atoi(string(body[i+len(marker) : len(body)-2]))
	return n, err == nil
}
