// vcsim-lite: govmomi's vCenter simulator (simulator.VPX model) as a test peer for vebaq.
//
// Built offline in GOPATH mode from Debian's golang-github-vmware-govmomi-dev (0.24.2); see
// build_vcsim and Simulator in tests/support.py, which build and start it. Prints the SDK URL
// on stdout once listening and stops on SIGTERM/SIGINT or when its stdin closes (so a crashed
// test run leaves no simulator).
//
// By default it is a faithful peer for reading events (events.go, propcollector.go, front.go):
// event collectors that page forward and honour their filter, as a vCenter does (vSphere API
// reference), with current govmomi's limits (collectors that go stale silently past
// -collector-capacity unread events, -max-collectors collectors in all), an event retention,
// EventManager.latestEvent kept current, and a property collector whose WaitForUpdatesEx wakes
// at once. -legacy-events leaves Debian 0.24's own event manager and property collector as
// they are (collectors that do not page forward: what older vmware/vcsim images do).
//
// -instance-uuid gives the simulator an instance UUID of its own (several vCenters in one test).
//
// Test hooks, outside the SOAP API, on the same listener: GET /vebaq/collectors (front.go).
// Sessions: SessionManager.TerminateSession (Debian's) ends another session; that session's
// later calls fail with NotAuthenticated, and a wait it has under way ends with that fault.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
)

func main() {
	addr := flag.String("l", "127.0.0.1:0", "listen address (port 0 picks a free port)")
	secure := flag.Bool("tls", false, "serve HTTPS with the simulator's self-signed certificate")
	user := flag.String("username", "", "required user name (empty: any non-empty name logs in)")
	pass := flag.String("password", "", "required password")
	hosts := flag.Int("host", 3, "hosts per cluster")
	legacy := flag.Bool("legacy-events", false,
		"keep govmomi 0.24's own event collectors and property collector (no paging forward)")
	capacity := flag.Int("collector-capacity", 1001,
		"events a collector holds; past that many unread it goes stale silently (0: no limit)")
	maxCollectors := flag.Int("max-collectors", 32, "event collectors in all, across sessions")
	retention := flag.Int("event-retention", 100000, "events the event manager keeps")
	instance := flag.String("instance-uuid", "",
		"the vCenter's instance UUID (default: govmomi 0.24's, the same in every simulator)")
	flag.Parse()

	model := simulator.VPX()
	model.ClusterHost = *hosts
	if err := model.Create(); err != nil {
		fmt.Fprintln(os.Stderr, "vcsim-lite:", err)
		os.Exit(1)
	}
	if *instance != "" {
		// govmomi 0.24 means to give each simulator a UUID of its own, but sets it on a copy:
		// every one has its template's. Several vCenters in one test need theirs.
		si := simulator.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance)
		si.Content.About.InstanceUuid = *instance
	}
	var events *peer
	if !*legacy {
		events = installPeer(peerConfig{capacity: *capacity, maxCollectors: *maxCollectors,
			retention: *retention})
	}
	listen := &url.URL{Host: *addr}
	if *user != "" {
		listen.User = url.UserPassword(*user, *pass)
	}
	model.Service.Listen = listen
	if *secure {
		model.Service.TLS = new(tls.Config)
	}
	server := model.Service.NewServer()
	// Set before anyone knows the address (printed below), so before the first request.
	server.Config.Handler = newFront(server.Config.Handler, events)
	sdk := *server.URL
	sdk.User = nil
	fmt.Println(sdk.String())

	done := make(chan os.Signal, 1)
	signal.Notify(done, os.Interrupt, syscall.SIGTERM)
	go func() { io.Copy(io.Discard, os.Stdin); done <- syscall.SIGTERM }()
	<-done
	server.Close()
	model.Remove()
}
