// vcsim-lite: govmomi's vCenter simulator (simulator.VPX model) as a test peer for vebaq.
//
// Built offline in GOPATH mode from Debian's golang-github-vmware-govmomi-dev; see
// tests/vcsim.py, which builds and starts it. Prints the SDK URL on stdout once listening and
// stops on SIGTERM/SIGINT or when its stdin closes (so a crashed test run leaves no simulator).
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
)

func main() {
	addr := flag.String("l", "127.0.0.1:0", "listen address (port 0 picks a free port)")
	secure := flag.Bool("tls", false, "serve HTTPS with the simulator's self-signed certificate")
	user := flag.String("username", "", "required user name (empty: any non-empty name logs in)")
	pass := flag.String("password", "", "required password")
	hosts := flag.Int("host", 3, "hosts per cluster")
	flag.Parse()

	model := simulator.VPX()
	model.ClusterHost = *hosts
	if err := model.Create(); err != nil {
		fmt.Fprintln(os.Stderr, "vcsim-lite:", err)
		os.Exit(1)
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
