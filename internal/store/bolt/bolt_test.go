package bolt

import (
	"testing"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/storetest"
)

func TestContract(t *testing.T) {
	storetest.Run(t, storetest.Backend{Kind: "bbolt", New: func(t *testing.T) func(t *testing.T) store.Store {
		dir := t.TempDir()
		return func(t *testing.T) store.Store {
			s, err := Open(dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			return s
		}
	}})
}
