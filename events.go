package main

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"frp-port-keeper/internal/store"
)

// eventHub hands every change (a history entry) to the live subscribers of
// /api/events and to the webhook notifiers. It never blocks the caller: a
// subscriber that falls behind is cut off (it reconnects and reads what it
// missed from /api/history), a notifier queues.
type eventHub struct {
	mu        sync.Mutex
	subs      map[chan store.HistoryEntry]struct{}
	closed    bool // the server is stopping: streams end, none start
	notifiers []*notifier
}

// maxEventSubscribers bounds concurrent /api/events streams.
const maxEventSubscribers = 64

func newEventHub(notifiers []*notifier) *eventHub {
	return &eventHub{subs: map[chan store.HistoryEntry]struct{}{}, notifiers: notifiers}
}

func (h *eventHub) publish(e store.HistoryEntry) {
	h.mu.Lock()
	for ch := range h.subs {
		select {
		case ch <- e:
		default: // too slow: end its stream
			delete(h.subs, ch)
			close(ch)
		}
	}
	h.mu.Unlock()
	for _, n := range h.notifiers {
		n.enqueue(e)
	}
}

// Why subscribe refused a stream.
var (
	errTooManyStreams = errors.New("too many event streams open")
	errHubClosed      = errors.New("the server is shutting down")
)

// subscribe returns a stream of entries, closed when the subscriber falls
// behind or the server stops; it refuses when there are too many
// subscribers or the server is stopping.
func (h *eventHub) subscribe() (ch chan store.HistoryEntry, cancel func(), err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.closed:
		return nil, nil, errHubClosed
	case len(h.subs) >= maxEventSubscribers:
		return nil, nil, errTooManyStreams
	}
	ch = make(chan store.HistoryEntry, 256)
	h.subs[ch] = struct{}{}
	return ch, func() {
		h.mu.Lock()
		if _, still := h.subs[ch]; still {
			delete(h.subs, ch)
			close(ch)
		}
		h.mu.Unlock()
	}, nil
}

// close ends every stream and refuses new ones: an open stream would
// otherwise hold the server's shutdown until its deadline.
func (h *eventHub) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for ch := range h.subs {
		delete(h.subs, ch)
		close(ch)
	}
}

// notifier POSTs each change to one webhook URL, in order, at least once
// while the server runs: a failed delivery is retried with backoff and the
// entries behind it wait (so each key's changes arrive in order). The
// queue is bounded; when it is full the oldest entry is dropped and
// counted, so a dead receiver costs memory up to the bound and never
// delays a plugin answer.
type notifier struct {
	url     string
	secret  []byte
	client  *http.Client
	log     *slog.Logger
	max     int
	backoff func(attempt int) time.Duration
	stats   *notifyStats

	mu    sync.Mutex
	queue []store.HistoryEntry
	wake  chan struct{}
}

// notifyStats are the notifiers' counters, shared with the metrics.
type notifyStats struct {
	delivered, failed, dropped func()
}

// notifyQueue bounds each webhook's queue.
const notifyQueue = 10000

// signatureHeader carries "sha256=" and the hex HMAC-SHA256 of the body
// under -notify-secret.
const signatureHeader = "X-Frp-Port-Keeper-Signature"

func newNotifier(url string, secret string, log *slog.Logger, stats *notifyStats) *notifier {
	return &notifier{url: url, secret: []byte(secret), log: log, max: notifyQueue, stats: stats,
		client: &http.Client{Timeout: 10 * time.Second}, wake: make(chan struct{}, 1),
		backoff: func(attempt int) time.Duration {
			return min(250*time.Millisecond<<min(attempt, 8), 30*time.Second)
		}}
}

func (n *notifier) enqueue(e store.HistoryEntry) {
	n.mu.Lock()
	if len(n.queue) >= n.max {
		n.queue = n.queue[1:]
		n.stats.dropped()
	}
	n.queue = append(n.queue, e)
	n.mu.Unlock()
	select {
	case n.wake <- struct{}{}:
	default:
	}
}

func (n *notifier) length() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.queue)
}

// run delivers until ctx ends.
func (n *notifier) run(ctx context.Context) {
	for {
		n.mu.Lock()
		var head store.HistoryEntry
		have := len(n.queue) > 0
		if have {
			head = n.queue[0]
		}
		n.mu.Unlock()
		if !have {
			select {
			case <-ctx.Done():
				return
			case <-n.wake:
			}
			continue
		}
		for attempt := 0; ; attempt++ {
			err := n.deliver(ctx, head)
			if err == nil {
				n.stats.delivered()
				break
			}
			n.stats.failed()
			if attempt == 0 || attempt%10 == 0 {
				n.log.Warn("webhook delivery failed; retrying", "url", n.url, "id", head.ID, "attempt", attempt+1, "err", err)
			}
			if !n.stillHead(head.ID) { // dropped meanwhile: the queue was full
				break
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(n.backoff(attempt)):
			}
		}
		n.mu.Lock()
		if len(n.queue) > 0 && n.queue[0].ID == head.ID {
			n.queue = n.queue[1:]
		}
		n.mu.Unlock()
	}
}

func (n *notifier) stillHead(id string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.queue) > 0 && n.queue[0].ID == id
}

func (n *notifier) deliver(ctx context.Context, e store.HistoryEntry) error {
	body, err := json.Marshal(e)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, "POST", n.url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "frp-port-keeper/"+version)
	req.Header.Set("X-Frp-Port-Keeper-Id", e.ID)
	if len(n.secret) > 0 {
		req.Header.Set(signatureHeader, "sha256="+sign(n.secret, body))
	}
	resp, err := n.client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("the receiver answered %s", resp.Status)
	}
	return nil
}

// sign is the hex HMAC-SHA256 of body under secret.
func sign(secret, body []byte) string {
	mac := hmac.New(sha256.New, secret)
	mac.Write(body)
	return hex.EncodeToString(mac.Sum(nil))
}
