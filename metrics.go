package main

import (
	"net/http"
	"sync/atomic"
	"time"

	"frp-port-keeper/internal/store"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the counters operators watch: decisions by outcome, how full
// the pool is, how long frps waits for us, and store trouble. They live in
// a registry of their own, so tests and several servers never share state.
type metrics struct {
	decisions   *prometheus.CounterVec
	byOutcome   map[string]prometheus.Counter // decisions, resolved once
	duration    prometheus.Histogram
	storeErrors prometheus.Counter
	reclaims    prometheus.Counter
	// historyFailures counts history entries that could not be written.
	historyFailures prometheus.Counter
	// restores counts times the store lost its data and was written back
	// from memory; restoredRecords, what became of each record then.
	restores        prometheus.Counter
	restoredRecords *prometheus.CounterVec
	notify          *notifyStats
	// notifyQueued reads the webhook queues' length at scrape time.
	notifyQueued atomic.Pointer[func() int]
	handler      http.Handler
}

// The outcomes counted in frp_port_keeper_decisions_total.
const (
	decisionInvalid     = "invalid"
	decisionPassthrough = "passthrough"
	decisionRejected    = "rejected"
)

func newMetrics(pool func() poolStats) *metrics {
	reg := prometheus.NewRegistry()
	m := &metrics{
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "frp_port_keeper_decisions_total",
			Help: "Plugin requests by outcome: hit, new, requested, pinned, rejected, invalid, passthrough.",
		}, []string{"outcome"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "frp_port_keeper_request_duration_seconds",
			Help:    "Time to answer a plugin request.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}),
		storeErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "frp_port_keeper_store_errors_total",
			Help: "Store calls that failed or missed their deadline.",
		}),
		reclaims: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "frp_port_keeper_reclaims_total",
			Help: "Ports taken back from keys not seen for longer than -reclaim-after.",
		}),
	}
	m.byOutcome = map[string]prometheus.Counter{}
	for _, o := range []string{string(outcomeHit), string(outcomeNew), string(outcomeRequested), string(outcomePinned), string(outcomeAdopted), decisionRejected, decisionInvalid, decisionPassthrough} {
		m.byOutcome[o] = m.decisions.WithLabelValues(o) // every series exists from the start
	}
	m.historyFailures = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "frp_port_keeper_history_write_failures_total",
		Help: "History entries that could not be written (the allocations stand).",
	})
	delivered := prometheus.NewCounter(prometheus.CounterOpts{Name: "frp_port_keeper_notify_delivered_total", Help: "Webhook deliveries the receiver accepted (2xx)."})
	failed := prometheus.NewCounter(prometheus.CounterOpts{Name: "frp_port_keeper_notify_failed_total", Help: "Webhook delivery attempts that failed (retried)."})
	dropped := prometheus.NewCounter(prometheus.CounterOpts{Name: "frp_port_keeper_notify_dropped_total", Help: "Changes dropped from a full webhook queue, oldest first."})
	queued := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "frp_port_keeper_notify_queue_length", Help: "Changes waiting for webhook delivery."},
		func() float64 {
			if f := m.notifyQueued.Load(); f != nil {
				return float64((*f)())
			}
			return 0
		})
	m.notify = &notifyStats{delivered: delivered.Inc, failed: failed.Inc, dropped: dropped.Inc}
	reg.MustRegister(m.historyFailures, delivered, failed, dropped, queued)
	m.restores = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "frp_port_keeper_store_restores_total",
		Help: "Times the store lost its data under the running server (etcd restarted empty, a backup restored) and this instance wrote back the allocations it held.",
	})
	m.restoredRecords = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "frp_port_keeper_store_restored_records_total",
		Help: "Allocations written back after the store lost its data, by result: restored, present (written back by another instance first), lost (to a record another writer made first).",
	}, []string{"result"})
	for _, r := range []string{"restored", "present", "lost"} {
		m.restoredRecords.WithLabelValues(r) // every series exists from the start
	}
	reg.MustRegister(m.restores, m.restoredRecords)
	poolPorts := prometheus.NewDesc("frp_port_keeper_pool_ports", "Ports of the pool by state and protocol (tcp and udp are two spaces, as in frps).", []string{"state", "proto"}, nil)
	reg.MustRegister(m.decisions, m.duration, m.storeErrors, m.reclaims, poolCollector{desc: poolPorts, stats: pool})
	m.handler = promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	return m
}

func (m *metrics) decided(outcome string, since time.Time) {
	m.byOutcome[outcome].Inc()
	m.duration.Observe(time.Since(since).Seconds())
}

// restored counts one write-back of a store that lost its data.
func (m *metrics) restored(r store.RestoreReport) {
	m.restores.Inc()
	m.restoredRecords.WithLabelValues("restored").Add(float64(r.Restored))
	m.restoredRecords.WithLabelValues("present").Add(float64(r.Present))
	m.restoredRecords.WithLabelValues("lost").Add(float64(r.Lost))
}

// poolCollector reads the pool's fill at scrape time.
type poolCollector struct {
	desc  *prometheus.Desc
	stats func() poolStats
}

func (c poolCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }
func (c poolCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.stats()
	for proto, sp := range map[string]*spaceStats{"tcp": s.TCP, "udp": s.UDP} {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(sp.Used), "used", proto)
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(sp.Free), "free", proto)
	}
}
