# Every target works on a fresh machine with Go installed; see README.md.
GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
# Fuzzing budgets are counts of executions, about 5 s each here: a
# duration budget can fail with a bare "context deadline exceeded" on a
# loaded machine (a race in Go's fuzz coordinator, go.dev/issue/75804,
# fixed after Go 1.26).
FUZZ_DECODE ?= 100000x
FUZZ_PLUGIN_REQUEST ?= 3000x
FUZZ_PARSE_PORTS ?= 10000x
PLATFORMS := linux/amd64 linux/arm64 linux/arm/7 darwin/arm64 windows/amd64
IMAGE    ?= frp-port-keeper
# staticcheck, pinned; go run fetches it from the module proxy once.
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

.PHONY: build run test test-unit test-deps lint bench bench-profile fuzz dist image

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/frp-port-keeper .

run: build
	./bin/frp-port-keeper

# image builds $(IMAGE):$(VERSION) and $(IMAGE):latest FROM scratch around
# the static binary, from a context of just that binary and an empty /data.
image: build
	rm -rf bin/image && mkdir -p bin/image/data && chmod 0700 bin/image/data && cp bin/frp-port-keeper bin/image/
	docker build --build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION) -t $(IMAGE):latest -f Dockerfile bin/image

# test runs every test (unit, end-to-end with real frps/frpc and etcd,
# Docker, browser, power cut), then each fuzz target for its budget.
test: test-deps
	$(GO) test -race -count=1 -timeout 30m ./...
	$(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZ_DECODE) ./internal/frpplugin
	$(GO) test -run '^$$' -fuzz '^FuzzPluginRequest$$' -fuzztime $(FUZZ_PLUGIN_REQUEST) .
	$(GO) test -run '^$$' -fuzz '^FuzzParsePorts$$' -fuzztime $(FUZZ_PARSE_PORTS) .

# test-unit runs every test that needs no frps, etcd, Docker, browser or
# loop device (go test -short skips those, saying why): under a minute on
# a warm cache.
test-unit:
	$(GO) test -short -count=1 ./...

# test-deps installs what the tests need beyond Go: Debian's chromium for
# the browser test and systemd-analyze for the unit check.
test-deps:
	@if ! command -v chromium >/dev/null || ! command -v systemd-analyze >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium systemd >/dev/null; \
	  else echo "make test needs chromium and systemd-analyze: sudo apt-get install chromium systemd"; exit 1; fi; \
	fi

# bench measures speed and memory against a bare net/http baseline and
# frps alone, and rewrites BENCHMARKS.md (a few minutes; not part of test).
bench:
	bench/run.sh

bench-profile:
	bench/run.sh profile

fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime 5m ./internal/frpplugin
	$(GO) test -run '^$$' -fuzz '^FuzzPluginRequest$$' -fuzztime 5m .
	$(GO) test -run '^$$' -fuzz '^FuzzParsePorts$$' -fuzztime 2m .

# lint: gofmt, go vet and staticcheck, all clean.
lint:
	@out="$$(gofmt -l .)"; if [ -n "$$out" ]; then echo "gofmt -l found unformatted files:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

# dist cross-compiles static binaries with SHA256SUMS.
dist:
	rm -rf dist && mkdir -p dist
	@set -e; for p in $(PLATFORMS); do \
	  os=$${p%%/*}; rest=$${p#*/}; arch=$${rest%%/*}; arm=; \
	  case "$$rest" in */*) arm=$${rest#*/};; esac; \
	  out=dist/frp-port-keeper-$(VERSION)-$$os-$$arch$${arm:+v$$arm}; [ $$os = windows ] && out=$$out.exe; \
	  echo "build $$out"; \
	  CGO_ENABLED=0 GOOS=$$os GOARCH=$$arch GOARM=$$arm $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $$out .; \
	done
	cd dist && sha256sum frp-port-keeper-* > SHA256SUMS
