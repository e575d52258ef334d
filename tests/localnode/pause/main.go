// Command pause is the pod sandbox ("pause") image's only program for the local single-node
// cluster (tests/localnode), built here because no registry is reachable to pull
// registry.k8s.io/pause. It does what Kubernetes' pause.c does: it holds the pod's namespaces
// open by doing nothing, reaps any zombie re-parented to it (it is PID 1 of the pod's PID
// namespace when the pod shares one), and exits 0 on SIGTERM or SIGINT so that stopping a
// sandbox is quick and clean. Static (CGO_ENABLED=0), no dependencies, so the image is just
// this binary.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

// version is printed by -v, as Kubernetes' pause does; images.sh tags the image with it.
const version = "3.10-ccred"

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		fmt.Println("pause.go", version)
		return
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "Warning: pause should be the first process")
	}
	// Registered before anything else can happen: a SIGTERM that arrived between start and
	// Notify would otherwise kill the process with the default action (exit status 143).
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		switch sig {
		case syscall.SIGTERM, syscall.SIGINT:
			fmt.Fprintf(os.Stderr, "Shutting down, got signal %d\n", sig.(syscall.Signal))
			os.Exit(0)
		case syscall.SIGCHLD:
			reap()
		}
	}
}

// reap collects every exited child without blocking. Signals coalesce (one SIGCHLD can stand
// for several exits), so it loops until there is nothing left to wait for.
func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
	}
}
