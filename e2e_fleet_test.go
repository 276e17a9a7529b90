package main

import (
	"fmt"
	"testing"

	"frp-port-keeper/internal/testenv"
)

// TestE2EFrpsPairFailover: two real frps (v0.65.0), each with its own
// plugin instance, share one real etcd. alice's frpc gets port P from
// frps-1; bob, at frps-2, gets another port; frps-1 goes away and alice's
// frpc, pointed at frps-2, gets P again and bytes flow through it.
func TestE2EFrpsPairFailover(t *testing.T) {
	v := frpVersions[0]
	etcdSrv := testenv.StartEtcd(t, nil)
	etcdArgs := []string{"-store", "etcd", "-etcd-endpoints", etcdSrv.Endpoint(), "-etcd-prefix", fmt.Sprintf("/e2e-pair-%d/", fleetPrefixes.Add(1))}
	env1 := newE2EEnv(t, v, func(e *e2eEnv) { e.pluginArgs = etcdArgs })
	env2 := newE2EEnv(t, v, func(e *e2eEnv) {
		e.pluginArgs = etcdArgs
		e.allow, e.pool = env1.allow, env1.pool // the same ports on both servers
	})
	echo, bobEcho := startTCPEcho(t), startTCPEcho(t)
	alice := proxySpec{Name: "ssh", Type: "tcp", LocalPort: echo.Port}

	first := startFrpc(t, env1, "alice", alice)
	p := waitProxy(t, env1, "tcp", "alice.ssh")
	env1.requireInPool(t, "alice.ssh", p.RemotePort)
	checkTCPEchoReaches(t, p.RemotePort, echo)

	startFrpc(t, env2, "bob", proxySpec{Name: "web", Type: "tcp", LocalPort: bobEcho.Port})
	if b := waitProxy(t, env2, "tcp", "bob.web"); b.RemotePort == p.RemotePort {
		t.Fatalf("bob.web at frps-2 got %d, alice's port at frps-1", b.RemotePort)
	}

	env1.frps.stop(t) // frps-1 goes away
	first.stop(t)
	startFrpc(t, env2, "alice", alice) // the same device, now at frps-2
	if got := waitProxy(t, env2, "tcp", "alice.ssh"); got.RemotePort != p.RemotePort {
		t.Fatalf("alice.ssh at frps-2 = %d; want %d, her port at frps-1", got.RemotePort, p.RemotePort)
	}
	checkTCPEchoReaches(t, p.RemotePort, echo)
}
