package main

// End-to-end test of the plugin serving HTTPS (-tls-cert/-tls-key) to a real
// frps that verifies its certificate (tlsVerify / tls_verify). It reuses the
// harness in e2e_test.go (frp builds, frpc, dashboard polling, echo servers,
// port blocks) and adds only what TLS needs: a throwaway PKI, a plugin
// started with the TLS flags and pinged over HTTPS, and an frps whose trust
// store is chosen by the test.
//
// frp's http plugin client (pkg/plugin/server/http.go, the same code in
// v0.51.3, v0.65.0 and v0.71.0) uses an addr that starts with "https://" as is, and
// gives its http.Transport a tls.Config{InsecureSkipVerify: !TLSVerify} with
// no RootCAs, so with tlsVerify the plugin's certificate is checked against
// Go's system roots. On Linux crypto/x509 reads those from SSL_CERT_FILE and
// SSL_CERT_DIR when they are set (and only from them), which is how each
// frps here is made to trust exactly one CA, whatever the machine trusts.

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"frp-port-keeper/internal/testenv"
)

// e2eTLSRefusalTimeout bounds the wait for frps to refuse a proxy because it
// cannot verify the plugin's certificate. It takes well under a second: frps
// calls the plugin as soon as frpc asks for the proxy, and the handshake
// fails at once.
const e2eTLSRefusalTimeout = 10 * time.Second

// TestE2ETLSPlugin: with the plugin serving HTTPS and frps verifying its
// certificate,
//   - trusted: frps trusts the CA that signed the plugin's certificate; a tcp
//     proxy without a remote port registers through the plugin, gets a port
//     from its pool, and bytes flow through that port;
//   - untrusted: frps trusts only an unrelated CA; frps refuses the proxy
//     (frpc reports a start error, frps logs the x509 failure), the proxy is
//     not online, and the plugin allocated nothing.
func TestE2ETLSPlugin(t *testing.T) {
	pki := newE2ETLSPKI(t)
	forEachFrpVersion(t, func(t *testing.T, v frpVersion) {
		t.Run("trusted", func(t *testing.T) {
			t.Parallel()
			env := newE2ETLSEnv(t, v, pki, pki.caFile)

			// The plugin port speaks TLS only: net/http answers a plain
			// HTTP request with 400 "Client sent an HTTP request to an
			// HTTPS server".
			if status, body, err := e2ePlainHTTPGet(env.pluginPort, "/ping"); err != nil || status != http.StatusBadRequest {
				t.Fatalf("plain HTTP GET /ping on the TLS plugin port %d: got status %d, body %q, err %v; want 400", env.pluginPort, status, body, err)
			}

			echo := startTCPEcho(t)
			startFrpc(t, env, "alice", proxySpec{Name: "web", Type: "tcp", LocalPort: echo.Port})
			got := waitProxy(t, env, "tcp", "alice.web")
			env.requireInPool(t, "alice.web", got.RemotePort)

			// The port is the plugin's decision, not frps's random pick
			// from allowPorts (which overlaps the pool).
			var a apiAllocation
			status, body := e2eTLSGetJSON(t, env, pki, "/api/allocations/alice.web", &a)
			if status != http.StatusOK || a.Port != got.RemotePort {
				t.Fatalf("plugin GET /api/allocations/alice.web over HTTPS: got status %d, body %s; want 200 with port %d (frps's remote port)", status, body, got.RemotePort)
			}
			checkTCPEchoReaches(t, got.RemotePort, echo)
		})

		t.Run("untrusted", func(t *testing.T) {
			t.Parallel()
			env := newE2ETLSEnv(t, v, pki, pki.otherCAFile)
			start := time.Now()
			startFrpc(t, env, "alice", proxySpec{Name: "web", Type: "tcp", LocalPort: startTCPEcho(t).Port})

			// frpc's start error and frps's log line that names the
			// cause; frpc would retry only after 30s.
			const x509Failure = "certificate signed by unknown authority"
			frpsLog := filepath.Join(env.dir, "frps.log")
			var startErr string
			deadline := time.Now().Add(e2eTLSRefusalTimeout)
			for {
				if env.frps.exited() {
					t.Fatalf("frps exited: %v", env.frps.waitErr)
				}
				if startErr == "" {
					startErr = frpcStartError(env, "alice.web")
				}
				if startErr != "" && e2eFileContains(frpsLog, x509Failure) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("frps not trusting the plugin's CA, after %v: frpc start error for alice.web %q, frps.log mentions %q: %v; want both",
						e2eTLSRefusalTimeout, startErr, x509Failure, e2eFileContains(frpsLog, x509Failure))
				}
				time.Sleep(e2ePollInterval)
			}
			t.Logf("refused after %v: frpc: %s", time.Since(start).Round(time.Millisecond), startErr)

			proxies, body, err := getProxies(env, "tcp")
			if err != nil {
				t.Fatalf("frps dashboard: %v (body %s)", err, body)
			}
			for _, p := range proxies {
				if p.Name == "alice.web" && p.Status == "online" {
					t.Fatalf("alice.web in frps dashboard: got online on port %d; want not online (frps cannot verify the plugin)", p.RemotePort)
				}
			}

			// frps reached the plugin but gave up in the handshake, so
			// the plugin never saw the request.
			var list allocationList
			if status, body := e2eTLSGetJSON(t, env, pki, "/api/allocations", &list); status != http.StatusOK || len(list.Allocations) != 0 {
				t.Fatalf("plugin GET /api/allocations over HTTPS: got status %d, body %s; want 200 with no allocations", status, body)
			}
			pluginLog := filepath.Join(env.dir, "plugin.log")
			deadline = time.Now().Add(e2eTLSRefusalTimeout)
			for !e2eFileContains(pluginLog, "TLS handshake error") {
				if time.Now().After(deadline) {
					t.Fatalf("plugin.log after %v: no %q; want the handshake frps aborted logged", e2eTLSRefusalTimeout, "TLS handshake error")
				}
				time.Sleep(e2ePollInterval)
			}
		})
	})
}

// ---------------------------------------------------------------------------
// PKI.

// e2eTLSPKI is a throwaway CA, a certificate for 127.0.0.1 that it signed,
// and an unrelated CA, as PEM files.
type e2eTLSPKI struct {
	caFile      string // the CA that signed certFile
	otherCAFile string // a CA that signed nothing here
	certFile    string // the plugin's certificate: IP SAN 127.0.0.1
	keyFile     string
	emptyDir    string         // for SSL_CERT_DIR: no certificates
	caPool      *x509.CertPool // caFile's CA, for the test's own HTTPS client
}

// newE2ETLSPKI makes ECDSA P-256 keys and certificates valid for an hour
// (and five minutes back, for clock skew) and writes them to a temp dir.
func newE2ETLSPKI(t testing.TB) *e2eTLSPKI {
	t.Helper()
	dir := t.TempDir()
	now := time.Now()
	newKey := func() *ecdsa.PrivateKey { return testenv.ECKey(t) }
	serial := func() *big.Int { return testenv.Serial(t) }
	writePEM := func(name, typ string, der []byte) string {
		return e2eWriteFile(t, dir, name, string(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})))
	}
	newCA := func(name string) (*x509.Certificate, *ecdsa.PrivateKey, []byte) {
		key := newKey()
		tmpl := &x509.Certificate{
			SerialNumber:          serial(),
			Subject:               pkix.Name{CommonName: name},
			NotBefore:             now.Add(-5 * time.Minute),
			NotAfter:              now.Add(time.Hour),
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
			BasicConstraintsValid: true,
			IsCA:                  true,
			MaxPathLenZero:        true,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			t.Fatal(err)
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return cert, key, der
	}

	ca, caKey, caDER := newCA("frp-port-keeper e2e test CA")
	_, _, otherDER := newCA("frp-port-keeper e2e unrelated CA")
	key := newKey()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "frp-port-keeper e2e plugin"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    now.Add(-5 * time.Minute),
		NotAfter:     now.Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	p := &e2eTLSPKI{
		caFile:      writePEM("ca.pem", "CERTIFICATE", caDER),
		otherCAFile: writePEM("other-ca.pem", "CERTIFICATE", otherDER),
		certFile:    writePEM("plugin.pem", "CERTIFICATE", der),
		keyFile:     writePEM("plugin-key.pem", "PRIVATE KEY", keyDER),
		emptyDir:    filepath.Join(dir, "no-certs"),
		caPool:      x509.NewCertPool(),
	}
	p.caPool.AddCert(ca)
	if err := os.Mkdir(p.emptyDir, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// ---------------------------------------------------------------------------
// Environment: plugin over HTTPS, frps verifying it.

// newE2ETLSEnv is newE2EEnv with the plugin serving HTTPS with pki's
// certificate (and polled with a client that trusts pki's CA) and frps
// calling it at https://127.0.0.1:PORT with tlsVerify, with
// SSL_CERT_FILE=trustFile and an empty SSL_CERT_DIR in its environment, so
// trustFile's CA is the only one frps trusts.
func newE2ETLSEnv(t *testing.T, v frpVersion, pki *e2eTLSPKI, trustFile string) *e2eEnv {
	t.Helper()
	return newE2EEnv(t, v, func(env *e2eEnv) {
		env.pluginArgs = []string{"-tls-cert", pki.certFile, "-tls-key", pki.keyFile}
		env.pluginScheme = "https"
		env.pluginClient = e2eTLSClient(pki)
		env.frpsPluginINI = "tls_verify = true\n"
		env.frpsPluginTOML = "tlsVerify = true\n"
		for _, kv := range os.Environ() {
			if !strings.HasPrefix(kv, "SSL_CERT_FILE=") && !strings.HasPrefix(kv, "SSL_CERT_DIR=") {
				env.frpsEnv = append(env.frpsEnv, kv)
			}
		}
		env.frpsEnv = append(env.frpsEnv, "SSL_CERT_FILE="+trustFile, "SSL_CERT_DIR="+pki.emptyDir)
	})
}

// e2eTLSClient is an HTTPS client that trusts only pki's CA.
func e2eTLSClient(pki *e2eTLSPKI) *http.Client {
	return &http.Client{
		Timeout: 2 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: pki.caPool},
			DisableKeepAlives: true,
		},
	}
}

// e2eTLSGetJSON GETs path from the plugin over HTTPS and decodes a 200 body
// into out.
func e2eTLSGetJSON(t testing.TB, env *e2eEnv, pki *e2eTLSPKI, path string, out any) (int, string) {
	t.Helper()
	resp, err := e2eTLSClient(pki).Get(fmt.Sprintf("https://127.0.0.1:%d%s", env.pluginPort, path))
	if err != nil {
		t.Fatalf("plugin GET %s over HTTPS: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("plugin GET %s over HTTPS: reading body: %v", path, err)
	}
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(body, out); err != nil {
			t.Fatalf("plugin GET %s over HTTPS: %v (body %s)", path, err, body)
		}
	}
	return resp.StatusCode, string(body)
}

// e2ePlainHTTPGet is GET path from the plugin over plain HTTP.
func e2ePlainHTTPGet(port int, path string) (int, string, error) {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d%s", port, path))
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

func e2eFileContains(path, s string) bool {
	data, err := os.ReadFile(path)
	return err == nil && strings.Contains(string(data), s)
}
