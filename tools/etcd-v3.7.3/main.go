// Command etcd is the etcd server, pinned at v3.7.3, that the etcd store's
// tests start as a real process (see etcd_test.go). It is its own module so
// etcd's server dependencies stay out of the plugin's go.mod.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
