// Wiring of the test peer into govmomi 0.24's simulator, and the HTTP front end.
//
// govmomi 0.24 gives no hook to replace the EventManager's methods: the registry's
// EventManager() accessor insists on its own type, and every internal event goes through it.
// So the EventManager stays govmomi's (PostEvent, properties), and the front end, which sees
// each SOAP request before the simulator does, points CreateCollectorForEvents and QueryEvents
// calls on it at our peerEventManager (registered under a reference of its own) by rewriting
// the request's _this. Sessions, authentication and dispatch stay the simulator's.
//
// The front end also serves the test hooks, outside the SOAP API:
//
//	GET /vebaq/collectors -> {"live": N, "stale": M, "limit": 32, "capacity": 1001,
//	                          "retention": 100000, "events": E, "legacy": false}
//
// (with -legacy-events: {"legacy": true}).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"regexp"
	"sort"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/types"
)

type peerConfig struct {
	capacity, maxCollectors, retention int
}

// installPeer replaces the simulator's event collectors and the property collector's waiting
// methods (call after model.Create, before NewServer).
func installPeer(cfg peerConfig) *peer {
	content := simulator.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance).Content
	em := simulator.Map.EventManager()
	p := &peer{capacity: cfg.capacity, maxCollectors: cfg.maxCollectors,
		retention: cfg.retention, em: em, emRef: em.Self, rootRef: content.RootFolder,
		categories: map[string]string{}}
	if p.retention < 1 {
		p.retention = 1
	}
	for _, info := range em.Description.EventInfo {
		p.categories[info.Key] = info.Category
	}
	notify = &notifier{self: ref{Type: "VebaqNotifier", Value: "vebaq-notifier"}, p: p,
		ch: make(chan struct{})}
	p.notify = notify

	// The tap: a Debian collector that sees every post. Created with the EventManager locked
	// (no post can slip between reading the history and listening), as an internal caller of
	// the EventManager so that its methods do not take that lock again.
	ctx := &simulator.Context{Context: context.Background(), Map: simulator.Map, Caller: &p.emRef,
		Session: &simulator.Session{UserSession: types.UserSession{Key: "vebaq-tap"},
			Registry: simulator.NewRegistry()}}
	simulator.Map.WithLock(em, func() {
		res := em.CreateCollectorForEvents(ctx, &types.CreateCollectorForEvents{This: p.emRef,
			Filter: types.EventFilterSpec{MaxCount: maxPageSize}})
		p.tapRef = res.(*methods.CreateCollectorForEventsBody).Res.Returnval
		tap := ctx.Session.Get(p.tapRef).(*simulator.EventHistoryCollector)
		history := tap.GetLatestPage() // Debian's order is off: sort by key
		sort.Slice(history, func(i, j int) bool {
			return history[i].GetEvent().Key < history[j].GetEvent().Key
		})
		for _, ev := range history {
			p.post(ev)
		}
		if len(history) > 0 {
			em.LatestEvent = history[len(history)-1]
		}
		tap.SetCollectorPageSize(ctx, &types.SetCollectorPageSize{This: p.tapRef, MaxCount: 1})
		em.MaxCollector = int32(cfg.maxCollectors)
		simulator.Map.AddHandler(notify)
	})

	pc := &peerPC{}
	pc.Self = content.PropertyCollector
	simulator.Map.Put(pc) // each session's default PropertyCollector is a new one of this type

	pem := &peerEventManager{p: p}
	pem.Self = ref{Type: "EventManager", Value: "vebaq-peer-EventManager"}
	simulator.Map.Put(pem)
	return p
}

// front is the HTTP handler in front of the simulator's.
type front struct {
	next http.Handler
	p    *peer // nil with -legacy-events
	this *regexp.Regexp
}

func newFront(next http.Handler, p *peer) *front {
	f := &front{next: next, p: p}
	if p != nil {
		f.this = regexp.MustCompile(`(<(?:[A-Za-z_][\w.-]*:)?_this\b[^>]*>)\s*` +
			regexp.QuoteMeta(p.emRef.Value) + `\s*(</(?:[A-Za-z_][\w.-]*:)?_this\s*>)`)
	}
	return f
}

var rerouted = map[string]bool{"CreateCollectorForEvents": true, "QueryEvents": true}

func (f *front) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/vebaq/collectors" {
		w.Header().Set("Content-Type", "application/json")
		if f.p == nil {
			_ = json.NewEncoder(w).Encode(collectorStats{Legacy: true})
		} else {
			_ = json.NewEncoder(w).Encode(f.p.stats())
		}
		return
	}
	if f.p != nil && r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/sdk") {
		body, err := io.ReadAll(r.Body)
		_ = r.Body.Close()
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		if bytes.Contains(body, []byte("CreateCollectorForEvents")) || bytes.Contains(body, []byte("QueryEvents")) {
			body = f.reroute(body)
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		r.ContentLength = int64(len(body))
	}
	f.next.ServeHTTP(w, r)
}

// reroute points an EventManager.CreateCollectorForEvents/QueryEvents request at the peer.
func (f *front) reroute(body []byte) []byte {
	method, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil || !rerouted[method.Name] || method.This != f.p.emRef {
		return body
	}
	loc := f.this.FindSubmatchIndex(body)
	if loc == nil {
		return body
	}
	var out bytes.Buffer
	out.Write(body[:loc[3]])
	out.WriteString("vebaq-peer-EventManager")
	out.Write(body[loc[4]:])
	return out.Bytes()
}
