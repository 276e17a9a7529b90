package main

// The container image, for real: `make image` builds it, Docker runs it on
// the host network with a named volume, and the real frps v0.65.0 and frpc
// (built from tools/, as in e2e_test.go) use it. Everything listens on
// 127.0.0.1, on ports chosen free at run time. Without a reachable Docker
// daemon the test is skipped and says why; .ci/run starts one and sets
// TEST_REQUIRE_DOCKER, which turns the skip into a failure.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"frp-port-keeper/internal/testenv"
)

const (
	dockerImageBuildTimeout = 10 * time.Minute // make image: go build, then docker build
	dockerCommandTimeout    = time.Minute      // any other docker command
	dockerHealthyTimeout    = 30 * time.Second // the HEALTHCHECK turning healthy at a 1s interval
	dockerTestVersion       = "v-docker-test"  // stamped into the binary and the image label
	dockerUser              = "65532:65532"
)

// TestDockerImage: the image runs as a non-root user, reports healthy, and
// serves a real frps on the host network; a proxy keeps its port across a
// container restart and across a new container on the same data volume.
func TestDockerImage(t *testing.T) {
	requireDocker(t)
	v := frpVersions[0] // v0.65.0, TOML
	env := &e2eEnv{v: v, bins: buildFrp(t, v), dir: t.TempDir(), pluginClient: &http.Client{Timeout: time.Second}}
	t.Cleanup(func() {
		if t.Failed() {
			e2eDumpLogs(t, env.dir)
		}
	})
	block := reservePortBlock(t, e2eFrpsAllowPortsLen)
	env.allow, env.pool = block, e2ePortRange{block.lo, block.lo + e2ePluginPoolSize - 1}
	env.pluginPort, env.bindPort, env.dashPort = testenv.FreePort(t), testenv.FreePort(t), testenv.FreePort(t)

	suffix := fmt.Sprintf("%d-%x", os.Getpid(), rand.Uint32())
	image := "frp-port-keeper-test-" + suffix
	start := time.Now()
	buildImage(t, image)
	t.Logf("make image took %v", time.Since(start).Round(time.Millisecond))
	ref := image + ":" + dockerTestVersion

	labels := dockerOK(t, "inspect", "-f", `{{index .Config.Labels "org.opencontainers.image.version"}} {{.Config.User}}`, ref)
	if want := dockerTestVersion + " " + dockerUser; labels != want {
		t.Errorf("image version label and user = %q; want %q", labels, want)
	}
	if out := dockerOK(t, "run", "--rm", ref, "version"); out != "frp-port-keeper "+dockerTestVersion {
		t.Errorf("docker run %s version = %q; want %q", ref, out, "frp-port-keeper "+dockerTestVersion)
	}

	// A root-owned 0600 frps.toml, as the systemd section calls usual: the
	// image's own user may not read it and is told how to let it; run as
	// root, the documented way, the same image reads it.
	private, empty := filepath.Join(t.TempDir(), "frps.toml"), filepath.Join(t.TempDir(), "empty.json")
	if err := os.WriteFile(private, []byte("bindPort = 7000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(empty, []byte(`{"allocations":[]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	readConfig := []string{"-v", private + ":/etc/frp/frps.toml:ro", "-v", empty + ":/in.json:ro"}
	importArgs := []string{"import", "-data-dir", "/data", "-frps-config", "/etc/frp/frps.toml", "/in.json"}
	if os.Getuid() == 0 {
		out, err := docker(t, append(append(append([]string{"run", "--rm"}, readConfig...), ref), importArgs...)...)
		if err == nil || !strings.Contains(err.Error(), "may not read it") || !strings.Contains(err.Error(), "user: \"0:0\"") {
			t.Errorf("the image's user reading a root-owned 0600 frps.toml: %v %s; want an error saying how to let it", err, out)
		}
		if out, err := docker(t, append(append(append([]string{"run", "--rm", "--user", "0:0"}, readConfig...), ref), importArgs...)...); err != nil {
			t.Errorf("run as root with a root-owned 0600 frps.toml: %v %s; want it read", err, out)
		}
	}

	volume := "frp-port-keeper-test-" + suffix
	dockerOK(t, "volume", "create", volume)
	t.Cleanup(func() { docker(t, "volume", "rm", "-f", volume) })

	// frps first: its config, mounted read-only into the container, is
	// the plugin's -frps-config, as in deploy/docker-compose.yml.
	env.frps = startFrps(t, env)
	frpsConfig := filepath.Join(env.dir, "frps.toml")
	startContainer := func(name string) {
		t.Helper()
		dockerOK(t, "run", "-d", "--name", name, "--network", "host", "--health-interval", "1s",
			"-v", volume+":/data", "-v", frpsConfig+":/etc/frp/frps.toml:ro",
			"-e", fmt.Sprintf("FRP_PORT_KEEPER_LISTEN=127.0.0.1:%d", env.pluginPort),
			ref, "-frps-config", "/etc/frp/frps.toml", "-allow-ports", env.pool.String())
		t.Cleanup(func() {
			if t.Failed() {
				if logs, err := docker(t, "logs", name); err == nil {
					t.Logf("--- docker logs %s:\n%s", name, logs)
				}
			}
			docker(t, "rm", "-f", name)
		})
		waitContainerPing(t, env, name)
	}
	first := "frp-port-keeper-test-" + suffix
	startContainer(first)
	waitHealthy(t, first)

	echo := startTCPEcho(t)
	aliceProxies := []proxySpec{{Name: "web", Type: "tcp", LocalPort: echo.Port}}
	alice := startFrpc(t, env, "alice", aliceProxies...)
	got := waitProxy(t, env, "tcp", "alice.web")
	env.requireInPool(t, "alice.web", got.RemotePort)
	checkTCPEcho(t, got.RemotePort)
	port := got.RemotePort

	steps := []struct {
		name    string
		restart func()
	}{
		{"docker restart", func() {
			dockerOK(t, "restart", first)
			waitContainerPing(t, env, first)
			// A newcomer registers first: a plugin that forgot alice's
			// port would give it to bob.
			bobEcho := startTCPEcho(t)
			startFrpc(t, env, "bob", proxySpec{Name: "web", Type: "tcp", LocalPort: bobEcho.Port})
			if bob := waitProxy(t, env, "tcp", "bob.web"); bob.RemotePort == port {
				t.Fatalf("after docker restart bob.web remote port = %d; want any pool port but alice.web's", bob.RemotePort)
			}
		}},
		{"new container on the same volume", func() {
			dockerOK(t, "stop", first)
			startContainer("frp-port-keeper-test-" + suffix + "-2")
		}},
	}
	for _, step := range steps {
		t.Logf("step: %s", step.name)
		alice.stop(t)
		waitProxyGone(t, env, "tcp", "alice.web")
		step.restart()
		alice = startFrpc(t, env, "alice", aliceProxies...)
		got := waitProxy(t, env, "tcp", "alice.web")
		if got.RemotePort != port {
			t.Fatalf("after %s alice.web remote port = %d; want %d (its port before)", step.name, got.RemotePort, port)
		}
		checkTCPEcho(t, got.RemotePort)
	}

	// The volume holds the allocations, readable by the image's own user:
	// export them with a throwaway container once the server has stopped.
	dockerOK(t, "stop", "frp-port-keeper-test-"+suffix+"-2")
	var exported exportFile
	out := dockerOK(t, "run", "--rm", "-v", volume+":/data", ref, "export")
	if err := json.Unmarshal([]byte(out), &exported); err != nil {
		t.Fatalf("export from the volume: %v\n%s", err, out)
	}
	found := false
	for _, r := range exported.Allocations {
		found = found || r.Key == "alice.web" && r.Port == port
	}
	if !found {
		t.Fatalf("export from the volume: got %s; want alice.web on port %d", out, port)
	}

	// docs/docker.md's restore, into a new volume: the same allocations
	// come back out of it.
	restored := volume + "-restored"
	dockerOK(t, "volume", "create", restored)
	t.Cleanup(func() { docker(t, "volume", "rm", "-f", restored) })
	ctx, cancel := context.WithTimeout(context.Background(), dockerCommandTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "docker", "run", "--rm", "-i", "-v", restored+":/data", ref, "import")
	cmd.Stdin = strings.NewReader(out)
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("restore into a new volume: %v\n%s", err, msg)
	}
	again := dockerOK(t, "run", "--rm", "-v", restored+":/data", ref, "export")
	var back exportFile
	if err := json.Unmarshal([]byte(again), &back); err != nil || len(back.Allocations) != len(exported.Allocations) ||
		!slices.ContainsFunc(back.Allocations, func(r exportRecord) bool { return r.Key == "alice.web" && r.Port == port }) {
		t.Fatalf("export of the restored volume: %v\n%s\nwant what was backed up:\n%s", err, again, out)
	}
}

// requireDocker skips the test, saying why, when no Docker daemon answers;
// with TEST_REQUIRE_DOCKER set (as .ci/run sets it) it fails instead.
func requireDocker(t *testing.T) {
	fullTier(t, "a Docker daemon")
	t.Helper()
	miss := t.Skipf
	if os.Getenv("TEST_REQUIRE_DOCKER") != "" {
		miss = t.Fatalf
	}
	if _, err := exec.LookPath("docker"); err != nil {
		miss("no docker command (%v): install docker.io and start dockerd, as .ci/run does", err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "docker", "info", "--format", "{{.ServerVersion}}")
	cmd.Stderr = &stderr
	if _, err := cmd.Output(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		miss("no Docker daemon reachable (docker info: %s): start dockerd, as .ci/run does", strings.SplitN(msg, "\n", 2)[0])
	}
}

// TestDockerImageSize: docs/docker.md's "about N MB" is the size of the
// image make image builds, to the nearest MB.
func TestDockerImageSize(t *testing.T) {
	requireDocker(t)
	doc, err := os.ReadFile("docs/docker.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`:latest` + "`" + ` \(about (\d+) MB\)`).FindSubmatch(doc)
	if m == nil {
		t.Fatal("docs/docker.md does not say the image's size as \"(about N MB)\" after :latest")
	}
	said, _ := strconv.Atoi(string(m[1]))
	image := fmt.Sprintf("frp-port-keeper-test-%d-%x", os.Getpid(), rand.Uint32())
	buildImage(t, image)
	size, err := strconv.ParseInt(dockerOK(t, "image", "inspect", "-f", "{{.Size}}", image+":"+dockerTestVersion), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	if got := int(math.Round(float64(size) / 1e6)); got != said {
		t.Errorf("the image is %d bytes, about %d MB; docs/docker.md says about %d MB", size, got, said)
	}
}

// buildImage runs `make image` with its own image name and version, and
// removes both tags when the test ends. (make build leaves
// bin/frp-port-keeper behind, stamped with the test version.)
func buildImage(t *testing.T, image string) {
	t.Helper()
	t.Cleanup(func() { docker(t, "rmi", image+":"+dockerTestVersion, image+":latest") })
	ctx, cancel := context.WithTimeout(context.Background(), dockerImageBuildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "make", "image", "IMAGE="+image, "VERSION="+dockerTestVersion)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make image: %v\n%s", err, out)
	}
}

// docker runs a docker command, bounded, and returns its trimmed stdout;
// the error carries stderr.
func docker(t testing.TB, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), dockerCommandTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "docker", args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("docker %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(stdout.String()), nil
}

func dockerOK(t testing.TB, args ...string) string {
	t.Helper()
	out, err := docker(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// waitContainerPing waits until the plugin in container name answers
// /ping on the host's loopback, failing early if the container stops.
func waitContainerPing(t testing.TB, env *e2eEnv, name string) {
	t.Helper()
	url := env.pluginURL("/ping")
	deadline := time.Now().Add(e2eReadyTimeout)
	for {
		resp, err := env.pluginClient.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if state, _ := docker(t, "inspect", "-f", "{{.State.Status}}", name); state != "running" && state != "created" {
			logs, _ := docker(t, "logs", name)
			t.Fatalf("container %s is %s before answering GET %s; its log:\n%s", name, state, url, logs)
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: no answer from container %s after %v (last error %v)", url, name, e2eReadyTimeout, err)
		}
		time.Sleep(e2ePollInterval)
	}
}

// waitHealthy waits until Docker's HEALTHCHECK (frp-port-keeper health)
// calls the container healthy.
func waitHealthy(t testing.TB, name string) {
	t.Helper()
	deadline := time.Now().Add(dockerHealthyTimeout)
	for {
		status := dockerOK(t, "inspect", "-f", "{{.State.Health.Status}}", name)
		if status == "healthy" {
			return
		}
		if time.Now().After(deadline) {
			log, _ := docker(t, "inspect", "-f", "{{json .State.Health.Log}}", name)
			t.Fatalf("container %s health = %q after %v; want healthy; checks: %s", name, status, dockerHealthyTimeout, log)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
