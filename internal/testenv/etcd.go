// Package testenv gives tests the real things they run against: tools
// built from the pinned modules under tools/ (GoBuildTool), and a real etcd
// server on loopback (StartEtcd), with certificates when asked.
package testenv

// A real etcd for the etcd store's tests: built once per test binary run
// from the pinned tool module tools/etcd-v3.7.3 into bin/etcd-v3.7.3/ (like
// frp in e2e_test.go), started on loopback ports chosen at run time with a
// t.TempDir data directory, and stopped in t.Cleanup. A build failure fails
// the test: CI must run these.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

const (
	etcdToolVersion   = "v3.7.3"
	etcdBuildTimeout  = 8 * time.Minute
	etcdReadyTimeout  = 20 * time.Second
	etcdStopTimeout   = 10 * time.Second
	etcdStartAttempts = 3 // ports chosen free can be taken before etcd binds them
)

var etcdBuild struct {
	once sync.Once
	bin  string
	err  error
}

// buildEtcd builds the etcd server into bin/etcd-v3.7.3/etcd once per test
// binary run (the go build cache makes repeat builds a few seconds).
func buildEtcd(t testing.TB) string {
	t.Helper()
	etcdBuild.once.Do(func() {
		start := time.Now()
		etcdBuild.bin, etcdBuild.err = doBuildEtcd()
		if etcdBuild.err == nil {
			t.Logf("built etcd %s into %s in %v", etcdToolVersion, etcdBuild.bin, time.Since(start).Round(time.Millisecond))
		}
	})
	if etcdBuild.err != nil {
		t.Fatalf("build etcd %s: %v", etcdToolVersion, etcdBuild.err)
	}
	return etcdBuild.bin
}

func doBuildEtcd() (string, error) {
	binDir, err := GoBuildTool("etcd-"+etcdToolVersion, etcdBuildTimeout, "etcd", ".")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(binDir, "etcd")
	vctx, vcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer vcancel()
	got, err := exec.CommandContext(vctx, bin, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %v", bin, err)
	}
	if want := "etcd Version: " + strings.TrimPrefix(etcdToolVersion, "v"); !strings.Contains(string(got), want) {
		return "", fmt.Errorf("%s --version: got %q; want %q", bin, got, want)
	}
	return bin, nil
}

// EtcdServer is one etcd process and how to reach it.
type EtcdServer struct {
	bin, dataDir, logPath string
	clientPort, peerPort  int
	pki                   *EtcdPKI // nil: plain http
	// token is --initial-cluster-token ("": etcd's default); another one
	// makes another cluster ID.
	token string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// StartEtcd starts a single-member etcd on loopback and waits for /health.
// With pki it serves https and requires client certificates signed by
// pki's CA.
func StartEtcd(t testing.TB, pki *EtcdPKI) *EtcdServer {
	if testing.Short() {
		t.Skip("needs a real etcd: run by make test, not by make test-unit")
	}
	t.Helper()
	e := &EtcdServer{bin: buildEtcd(t), dataDir: t.TempDir(), pki: pki}
	e.logPath = filepath.Join(e.dataDir, "..", "etcd.log")
	t.Cleanup(func() {
		e.Stop()
		if t.Failed() {
			if log, err := os.ReadFile(e.logPath); err == nil {
				t.Logf("etcd log (%s):\n%s", e.logPath, etcdTail(log, 60))
			}
		}
	})
	var err error
	for range etcdStartAttempts {
		e.clientPort, e.peerPort = FreePort(t), FreePort(t)
		if e.clientPort == e.peerPort {
			continue
		}
		if err = e.launch(); err == nil {
			return e
		}
		t.Logf("etcd start: %v; retrying on other ports", err)
	}
	t.Fatalf("start etcd: %v", err)
	return nil
}

func (e *EtcdServer) Scheme() string {
	if e.pki != nil {
		return "https"
	}
	return "http"
}

// TLS is the certificates etcd serves with and trusts; nil: plain http.
func (e *EtcdServer) TLS() *EtcdPKI { return e.pki }

// Endpoint is the client URL.
func (e *EtcdServer) Endpoint() string {
	return fmt.Sprintf("%s://127.0.0.1:%d", e.Scheme(), e.clientPort)
}

// launch starts etcd on e's ports and data directory and waits until it
// is healthy.
func (e *EtcdServer) launch() error {
	peer := fmt.Sprintf("http://127.0.0.1:%d", e.peerPort)
	args := []string{
		"--name", "test",
		"--data-dir", e.dataDir,
		"--listen-client-urls", e.Endpoint(),
		"--advertise-client-urls", e.Endpoint(),
		"--listen-peer-urls", peer,
		"--initial-advertise-peer-urls", peer,
		"--initial-cluster", "test=" + peer,
		"--initial-cluster-state", "new",
		"--log-level", "warn",
		"--log-outputs", "stderr",
		// The tests kill the process, never the machine: the page cache
		// keeps what a killed etcd wrote.
		"--unsafe-no-fsync",
	}
	if e.token != "" {
		args = append(args, "--initial-cluster-token", e.token)
	}
	if e.pki != nil {
		args = append(args, "--cert-file", e.pki.ServerCert, "--key-file", e.pki.ServerKey,
			"--client-cert-auth", "--trusted-ca-file", e.pki.CAFile)
	}
	logFile, err := os.OpenFile(e.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(e.bin, args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "ETCD") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return err
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		logFile.Close()
		close(done)
	}()
	e.mu.Lock()
	e.cmd, e.done = cmd, done
	e.mu.Unlock()

	client := e.HTTPClient()
	deadline := time.Now().Add(etcdReadyTimeout)
	for {
		select {
		case <-done:
			log, _ := os.ReadFile(e.logPath)
			return fmt.Errorf("etcd exited before it was healthy: %s", etcdTail(log, 5))
		default:
		}
		if resp, err := client.Get(e.Endpoint() + "/health"); err == nil {
			body := make([]byte, 512)
			n, _ := resp.Body.Read(body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && bytes.Contains(body[:n], []byte(`"health":"true"`)) {
				return nil
			}
		}
		if time.Now().After(deadline) {
			e.Stop()
			return fmt.Errorf("etcd not healthy within %v", etcdReadyTimeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// HTTPClient can GET /health (with the client certificate under TLS).
func (e *EtcdServer) HTTPClient() *http.Client {
	tr := &http.Transport{}
	if e.pki != nil {
		tr.TLSClientConfig = e.pki.ClientTLS()
	}
	return &http.Client{Transport: tr, Timeout: 2 * time.Second}
}

func (e *EtcdServer) Signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal etcd %v: %v", sig, err)
	}
}

// Pause stops etcd in its tracks (SIGSTOP): connections stay open, nothing
// is answered. It returns once the kernel says the process is stopped (a
// signal is delivered asynchronously: etcd could answer one more request).
func (e *EtcdServer) Pause(t testing.TB) {
	t.Helper()
	e.Signal(t, syscall.SIGSTOP)
	e.mu.Lock()
	pid := e.cmd.Process.Pid
	e.mu.Unlock()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return // no /proc: trust the signal
		}
		// The state follows the command name in parentheses: "pid (etcd) T ...".
		if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) && (stat[i+2] == 'T' || stat[i+2] == 't') {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatal("etcd did not stop within 5s of SIGSTOP")
}

// Resume lets a paused etcd go on (SIGCONT).
func (e *EtcdServer) Resume(t testing.TB) { t.Helper(); e.Signal(t, syscall.SIGCONT) }

// Kill SIGKILLs etcd and waits for it to exit.
func (e *EtcdServer) Kill(t testing.TB) {
	t.Helper()
	if !e.Stop() {
		t.Fatalf("etcd did not exit within %v of SIGKILL", etcdStopTimeout)
	}
}

// Stop kills etcd (resuming it first, in case it is paused) and reports
// whether it exited.
func (e *EtcdServer) Stop() bool {
	e.mu.Lock()
	cmd, done := e.cmd, e.done
	e.mu.Unlock()
	if cmd == nil {
		return true
	}
	cmd.Process.Signal(syscall.SIGCONT)
	cmd.Process.Kill()
	select {
	case <-done:
		return true
	case <-time.After(etcdStopTimeout):
		return false
	}
}

// Restart kills etcd if it runs and starts it again on the same data
// directory and ports.
func (e *EtcdServer) Restart(t testing.TB) {
	t.Helper()
	e.Kill(t)
	if err := e.launch(); err != nil {
		t.Fatalf("restart etcd: %v", err)
	}
}

// Wipe kills etcd, empties its data directory (a lost volume) and starts
// it again on the same ports: an etcd with none of its data. A token other
// than the one it ran with makes it another cluster (another cluster ID).
func (e *EtcdServer) Wipe(t testing.TB, token string) {
	t.Helper()
	e.Kill(t)
	e.token = token
	if err := os.RemoveAll(e.dataDir); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(e.dataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := e.launch(); err != nil {
		t.Fatalf("start etcd on an empty data directory: %v", err)
	}
}

// Client is a plain etcd Client for the test's own reads and compactions.
func (e *EtcdServer) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	cfg := clientv3.Config{Endpoints: []string{e.Endpoint()}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()}
	if e.pki != nil {
		cfg.TLS = e.pki.ClientTLS()
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// etcdTail is the last n lines of log.
func etcdTail(log []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(log), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// ---------------------------------------------------------------------------
// PKI.

// EtcdPKI is a CA, a server certificate for 127.0.0.1 and localhost, a
// client certificate it signed, and a client certificate an unrelated CA
// signed, as PEM files.
type EtcdPKI struct {
	CAFile                string
	ServerCert, ServerKey string
	ClientCert, ClientKey string
	OtherCert, OtherKey   string // signed by a CA etcd does not trust
	OtherCAFile           string
	caPool                *x509.CertPool
	clientPair            tls.Certificate
}

// NewEtcdPKI makes ECDSA P-256 keys and certificates valid for an hour.
func NewEtcdPKI(t testing.TB) *EtcdPKI {
	t.Helper()
	dir := t.TempDir()
	now := time.Now()
	write := func(name, typ string, der []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	newKey := func() *ecdsa.PrivateKey { return ECKey(t) }
	serial := func() *big.Int { return Serial(t) }
	type issued struct {
		cert *x509.Certificate
		key  *ecdsa.PrivateKey
		der  []byte
	}
	issue := func(tmpl *x509.Certificate, parent *issued) issued {
		key := newKey()
		tmpl.SerialNumber = serial()
		tmpl.NotBefore, tmpl.NotAfter = now.Add(-5*time.Minute), now.Add(time.Hour)
		signer, signerKey := tmpl, key
		if parent != nil {
			signer, signerKey = parent.cert, parent.key
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
		if err != nil {
			t.Fatal(err)
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return issued{cert, key, der}
	}
	caTmpl := func(name string) *x509.Certificate {
		return &x509.Certificate{Subject: pkix.Name{CommonName: name}, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
			BasicConstraintsValid: true, IsCA: true, MaxPathLenZero: true}
	}
	leafTmpl := func(name string, usage ...x509.ExtKeyUsage) *x509.Certificate {
		return &x509.Certificate{Subject: pkix.Name{CommonName: name}, KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: usage}
	}
	keyPEM := func(name string, k *ecdsa.PrivateKey) string {
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return write(name, "PRIVATE KEY", der)
	}

	ca := issue(caTmpl("frp-port-keeper etcd test CA"), nil)
	other := issue(caTmpl("frp-port-keeper unrelated CA"), nil)
	srvTmpl := leafTmpl("etcd", x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth)
	srvTmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	srvTmpl.DNSNames = []string{"localhost"}
	srv := issue(srvTmpl, &ca)
	cli := issue(leafTmpl("frp-port-keeper", x509.ExtKeyUsageClientAuth), &ca)
	stranger := issue(leafTmpl("stranger", x509.ExtKeyUsageClientAuth), &other)

	p := &EtcdPKI{
		CAFile:      write("ca.pem", "CERTIFICATE", ca.der),
		OtherCAFile: write("other-ca.pem", "CERTIFICATE", other.der),
		ServerCert:  write("server.pem", "CERTIFICATE", srv.der),
		ServerKey:   keyPEM("server-key.pem", srv.key),
		ClientCert:  write("client.pem", "CERTIFICATE", cli.der),
		ClientKey:   keyPEM("client-key.pem", cli.key),
		OtherCert:   write("stranger.pem", "CERTIFICATE", stranger.der),
		OtherKey:    keyPEM("stranger-key.pem", stranger.key),
		caPool:      x509.NewCertPool(),
	}
	p.caPool.AddCert(ca.cert)
	pair, err := tls.LoadX509KeyPair(p.ClientCert, p.ClientKey)
	if err != nil {
		t.Fatal(err)
	}
	p.clientPair = pair
	return p
}

// ClientTLS trusts the CA and presents the client certificate.
func (p *EtcdPKI) ClientTLS() *tls.Config {
	return &tls.Config{RootCAs: p.caPool, Certificates: []tls.Certificate{p.clientPair}, MinVersion: tls.VersionTLS12}
}

// ---------------------------------------------------------------------------
// Helpers for the etcd store's tests.

// absolute bin/NAME.
func GoBuildTool(name string, timeout time.Duration, out string, pkgs ...string) (string, error) {
	return GoBuildToolTags(name, timeout, out, "", pkgs...)
}

// GoBuildToolTags is GoBuildTool with go build -tags tags ("": none).
func GoBuildToolTags(name string, timeout time.Duration, out, tags string, pkgs ...string) (string, error) {
	toolDir := filepath.Join(ModuleRoot(), "tools", name)
	binDir := filepath.Join(ModuleRoot(), "bin", name)
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return "", err
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("building %s needs the go command on PATH: %w", name, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	target := binDir + string(filepath.Separator) // one binary per package
	if out != "" {
		target = filepath.Join(binDir, out)
	}
	args := []string{"build", "-o", target}
	if tags != "" {
		args = append(args, "-tags", tags)
	}
	cmd := exec.CommandContext(ctx, goTool, append(args, pkgs...)...)
	cmd.Dir = toolDir
	cmd.Env = append(os.Environ(), "GOWORK=off")
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s (in %s): %v\n%s", strings.Join(cmd.Args, " "), toolDir, err, buf.String())
	}
	return binDir, nil
}

// ModuleRoot is the repository's root directory, whatever the test's
// working directory.
func ModuleRoot() string {
	_, here, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(here), "..", "..")
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// ECKey is a fresh ECDSA P-256 key for the tests' certificates.
func ECKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// Serial is a random certificate serial number.
func Serial(t testing.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// EtcdGet reads the raw value of name under prefix ("" when absent).
func EtcdGet(t testing.TB, cli *clientv3.Client, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return ""
	}
	return string(resp.Kvs[0].Value)
}

// EtcdCount is how many records lie under a prefix.
func EtcdCount(t testing.TB, cli *clientv3.Client, prefix string) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	return resp.Count
}
