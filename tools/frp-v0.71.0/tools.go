//go:build tools

// Package tools pins github.com/fatedier/frp at v0.71.0 so the e2e tests can
// build frps and frpc from it (see e2e_test.go).
package tools

import (
	_ "github.com/fatedier/frp/cmd/frpc"
	_ "github.com/fatedier/frp/cmd/frps"
)
