package storetest

import (
	"testing"

	"frp-port-keeper/internal/store"
)

// The fake the allocator's tests use keeps the contract too.
func TestFakeKeepsTheContract(t *testing.T) {
	Run(t, Backend{Kind: "fake", New: func(t *testing.T) func(t *testing.T) store.Store {
		f := NewFake()
		return func(t *testing.T) store.Store { return f }
	}})
}
