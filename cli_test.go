package main

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"frp-port-keeper/internal/testenv"
)

// runCLI calls run with buffers and an environment of env only.
func runCLI(env map[string]string, args ...string) (stdout, stderr string, err error) {
	var out, errOut bytes.Buffer
	err = run(context.Background(), args, func(k string) string { return env[k] }, &out, &errOut)
	return out.String(), errOut.String(), err
}

// TestHelp: -h, --help and help print one usage to stdout, list the
// commands at the top, and give each command its own usage line and only
// its own flags.
func TestHelp(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		want    []string // in stdout
		notWant []string // not in stdout
	}{
		{name: "-h lists the commands and serve's flags once", args: []string{"-h"},
			want: []string{"usage: frp-port-keeper [COMMAND] [flags] [ARGS]", "  list ", "  assign KEY PORT ", "  release KEY ", "  health ", "  help [COMMAND] ", "-plugin-allow", "-data-dir"}},
		{name: "--help", args: []string{"--help"}, want: []string{"usage: frp-port-keeper [COMMAND] [flags] [ARGS]", "  show KEY "}},
		{name: "help", args: []string{"help"}, want: []string{"usage: frp-port-keeper [COMMAND] [flags] [ARGS]", "  import [FILE] "}},
		{name: "-h after serve's flags", args: []string{"-data-dir", "x", "-h"}, want: []string{"usage: frp-port-keeper [COMMAND] [flags] [ARGS]"}},
		{name: "serve -h", args: []string{"serve", "-h"}, want: []string{"usage: frp-port-keeper [serve] [flags]\n", "-listen", "-plugin-allow"},
			notWant: []string{"commands:", "-json"}},
		{name: "release -h", args: []string{"release", "-h"}, want: []string{"usage: frp-port-keeper release [flags] KEY | -port PORT [-proto tcp|udp]\n", "-server", "-admin-token", "-port"},
			notWant: []string{"-json", "-user", "-data-dir"}},
		{name: "assign -h", args: []string{"assign", "-h"}, want: []string{"usage: frp-port-keeper assign [flags] KEY PORT\n", "-server"},
			notWant: []string{"-json", "-user"}},
		{name: "help assign", args: []string{"help", "assign"}, want: []string{"usage: frp-port-keeper assign [flags] KEY PORT\n"}},
		{name: "list --help", args: []string{"list", "--help"}, want: []string{"usage: frp-port-keeper list [flags]\n", "-json", "-user", "-server"}},
		{name: "show -h", args: []string{"show", "-h"}, want: []string{"usage: frp-port-keeper show [flags] KEY\n"}, notWant: []string{"-json"}},
		{name: "import -h", args: []string{"import", "-h"}, want: []string{"usage: frp-port-keeper import [flags] [FILE]\n", "-data-dir", "-store", "-server", "-etcd-endpoints"},
			notWant: []string{"-json", "-listen"}},
		{name: "health -h", args: []string{"health", "-h"}, want: []string{"usage: frp-port-keeper health [flags]\n", "-server"}, notWant: []string{"-admin-token"}},
		{name: "version -h", args: []string{"version", "-h"}, want: []string{"usage: frp-port-keeper version\n"}, notWant: []string{"flags"}},
		{name: "help help", args: []string{"help", "help"}, want: []string{"usage: frp-port-keeper help [COMMAND]\n"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, errOut, err := runCLI(nil, tt.args...)
			if err != nil || errOut != "" {
				t.Fatalf("run(%q) = %v, stderr %q; want nil and nothing on stderr", tt.args, err, errOut)
			}
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("run(%q) stdout lacks %q:\n%s", tt.args, w, out)
				}
			}
			for _, w := range tt.notWant {
				if strings.Contains(out, w) {
					t.Errorf("run(%q) stdout has %q; want it absent:\n%s", tt.args, w, out)
				}
			}
			if n := strings.Count(out, "usage:"); n != 1 {
				t.Errorf("run(%q) printed usage %d times; want once:\n%s", tt.args, n, out)
			}
		})
	}
}

// TestCLIErrors: every mistake is one line naming it, with the way to the
// help, and nothing else.
func TestCLIErrors(t *testing.T) {
	closed := testenv.FreePort(t) // nothing listens there
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want string // the whole error
	}{
		{"bad flag of a command", []string{"list", "-nope"}, nil,
			"flag provided but not defined: -nope (run 'frp-port-keeper list -h' for usage)"},
		{"bad flag of serve", []string{"-nope"}, nil,
			"flag provided but not defined: -nope (run 'frp-port-keeper -h' for usage)"},
		{"another command's flag", []string{"release", "x", "-json"}, nil,
			"flag provided but not defined: -json (run 'frp-port-keeper release -h' for usage)"},
		{"flag without its value", []string{"release", "x", "-server"}, nil,
			"flag needs an argument: -server (run 'frp-port-keeper release -h' for usage)"},
		{"unknown command", []string{"frobnicate"}, nil, `unknown command "frobnicate": run 'frp-port-keeper help' for the list`},
		{"help for an unknown command", []string{"help", "frobnicate"}, nil, `unknown command "frobnicate": run 'frp-port-keeper help' for the list`},
		{"missing argument", []string{"release"}, nil, "missing KEY (or -port PORT)"},
		{"key and port", []string{"release", "a.b", "-port", "10"}, nil, "give KEY or -port PORT, not both"},
		{"missing port", []string{"assign", "a.b"}, nil, "assign needs PORT (usage: frp-port-keeper assign [flags] KEY PORT)"},
		{"extra argument", []string{"release", "a", "b"}, nil, `unexpected argument "b" (usage: frp-port-keeper release [flags] KEY | -port PORT [-proto tcp|udp])`},
		{"port not a number", []string{"assign", "a.b", "ssh"}, nil, `port "ssh" is not a number (usage: frp-port-keeper assign [flags] KEY PORT)`},
		{"bad server", []string{"list", "-server", "ftp://x"}, nil, `-server "ftp://x": want a URL (http://127.0.0.1:8080) or host:port`},
		{"server not running", []string{"release", "dev2.cam", "-server", fmt.Sprintf("127.0.0.1:%d", closed)}, nil,
			fmt.Sprintf("cannot reach frp-port-keeper at http://127.0.0.1:%d (connection refused): is it running? set -server", closed)},
		{"server from the server's own listen setting", []string{"list"}, map[string]string{"FRP_PORT_KEEPER_LISTEN": fmt.Sprintf("0.0.0.0:%d", closed)},
			fmt.Sprintf("cannot reach frp-port-keeper at http://127.0.0.1:%d (connection refused): is it running? set -server", closed)},
		{"health of nothing", []string{"health", "-server", fmt.Sprintf("http://127.0.0.1:%d/", closed)}, nil,
			fmt.Sprintf("cannot reach frp-port-keeper at http://127.0.0.1:%d (connection refused): is it running? set -server", closed)},
		{"bad -plugin-allow", []string{"-listen", "127.0.0.1:0", "-plugin-allow", "10.0.0.0/33"}, nil,
			`-plugin-allow: "10.0.0.0/33" is not an address or CIDR, e.g. 10.0.0.0/8 or 192.0.2.7`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, errOut, err := runCLI(tt.env, tt.args...)
			if err == nil || err.Error() != tt.want {
				t.Fatalf("run(%q) = %v; want %q", tt.args, err, tt.want)
			}
			if out != "" || errOut != "" {
				t.Errorf("run(%q) printed stdout %q, stderr %q; want nothing but the error", tt.args, out, errOut)
			}
		})
	}
}

// TestCLIFlagsAnywhere: flags may follow the arguments, -server takes
// host:port, and without -server the commands find the server through
// FRP_PORT_KEEPER_LISTEN.
func TestCLIFlagsAnywhere(t *testing.T) {
	base, _ := startServer(t, "-data-dir", t.TempDir(), "-allow-ports", "31000-31009")
	register(t, base, "dev2", "dev2.cam", "tcp")
	register(t, base, "dev3", "dev3.cam", "tcp")
	hostPort := strings.TrimPrefix(base, "http://")
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want string // in stdout
	}{
		{"flags after the argument", []string{"show", "dev2.cam", "-server", base}, nil, `"key": "dev2.cam"`},
		{"flags between the arguments", []string{"assign", "dev2.cam", "-server", base, "31005"}, nil, "dev2.cam now holds port 31005"},
		{"host:port", []string{"show", "-server", hostPort, "dev2.cam"}, nil, `"port": 31005`},
		{"server from FRP_PORT_KEEPER_SERVER", []string{"show", "dev2.cam"}, map[string]string{"FRP_PORT_KEEPER_SERVER": hostPort}, `"port": 31005`},
		{"server from FRP_PORT_KEEPER_LISTEN", []string{"list", "-json"}, map[string]string{"FRP_PORT_KEEPER_LISTEN": hostPort}, `"key": "dev3.cam"`},
		{"-server wins over the listen setting", []string{"list", "-server", base}, map[string]string{"FRP_PORT_KEEPER_LISTEN": "127.0.0.1:1"}, "dev3.cam"},
		{"list flags after list", []string{"list", "-server", base, "-user", "dev3", "-json"}, nil, `"key": "dev3.cam"`},
		{"release with the flag last", []string{"release", "dev3.cam", "-server", base}, nil, "released dev3.cam"},
		{"health", []string{"health"}, map[string]string{"FRP_PORT_KEEPER_LISTEN": hostPort}, "ok: frp-port-keeper at " + base + " answers /ping"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, errOut, err := runCLI(tt.env, tt.args...)
			if err != nil || !strings.Contains(out, tt.want) {
				t.Fatalf("run(%q) = %v, stdout %q, stderr %q; want stdout containing %q", tt.args, err, out, errOut, tt.want)
			}
		})
	}
	// After "--" everything is an argument, even what looks like a flag.
	_, _, err := runCLI(nil, "release", "-server", base, "--", "-dev4.cam")
	if err == nil || !strings.Contains(err.Error(), "no allocation for this key") {
		t.Fatalf("release -- -dev4.cam = %v; want the server's 404 for key -dev4.cam", err)
	}
}

// TestCLIServerAddress: how -server and the environment become a URL.
func TestCLIServerAddress(t *testing.T) {
	tests := []struct {
		server string
		env    map[string]string
		want   string
	}{
		{"", nil, "http://127.0.0.1:8080"},
		{"127.0.0.1:8097", nil, "http://127.0.0.1:8097"},
		{"http://10.0.0.1:8080/", nil, "http://10.0.0.1:8080"},
		{"https://keeper.example.net:8443", nil, "https://keeper.example.net:8443"},
		{"keeper.example.net:8080", nil, "http://keeper.example.net:8080"},
		{"[::1]:8080", nil, "http://[::1]:8080"},
		{":8080", nil, "http://127.0.0.1:8080"},
		{"", map[string]string{"FRP_PORT_KEEPER_LISTEN": "0.0.0.0:9000"}, "http://127.0.0.1:9000"},
		{"", map[string]string{"FRP_PORT_KEEPER_LISTEN": "[::]:9000"}, "http://[::1]:9000"},
		{"", map[string]string{"FRP_PORT_KEEPER_LISTEN": "127.0.0.1:9000", "FRP_PORT_KEEPER_TLS_CERT": "c.pem"}, "https://127.0.0.1:9000"},
		{"127.0.0.1:9001", map[string]string{"FRP_PORT_KEEPER_LISTEN": "127.0.0.1:9000"}, "http://127.0.0.1:9001"},
	}
	for _, tt := range tests {
		got, err := serverBase(tt.server, func(k string) string { return tt.env[k] })
		if err != nil || got != tt.want {
			t.Errorf("serverBase(%q, %v) = %q, %v; want %q", tt.server, tt.env, got, err, tt.want)
		}
		if _, err := url.Parse(got); err != nil {
			t.Errorf("serverBase(%q) = %q: not a URL: %v", tt.server, got, err)
		}
	}
}

// TestCLIHealthAnswer: health refuses a server that is not frp-port-keeper.
func TestCLIHealthAnswer(t *testing.T) {
	stranger := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "not found", http.StatusNotFound)
	}))
	defer stranger.Close()
	_, _, err := runCLI(nil, "health", "-server", stranger.URL)
	want := stranger.URL + `/ping answered 404 Not Found "not found\n", not 200 pong: is frp-port-keeper the server there? set -server`
	if err == nil || err.Error() != want {
		t.Fatalf("health against a stranger = %v; want %q", err, want)
	}
}

// TestHelpInREADME: docs/operating.md (Flags) shows release -h as the program prints it.
func TestHelpInREADME(t *testing.T) {
	readme, err := os.ReadFile("docs/operating.md")
	if err != nil {
		t.Fatal(err)
	}
	const marker = "$ frp-port-keeper release -h\n"
	_, rest, ok := strings.Cut(string(readme), marker)
	shown, _, _ := strings.Cut(rest, "```")
	out, _, err := runCLI(nil, "release", "-h")
	if !ok || err != nil || shown != out {
		t.Fatalf("README shows release -h as\n%s\nwant what it prints:\n%s", shown, out)
	}
}

// TestServeHelpWebhookSignature: serve -h says how a webhook request is
// signed, in full: the header, its "sha256=" prefix and what is hashed
// (newWebhookReceiver checks that the server signs so).
func TestServeHelpWebhookSignature(t *testing.T) {
	out, _, err := runCLI(nil, "serve", "-h")
	if err != nil {
		t.Fatal(err)
	}
	_, secretHelp, _ := strings.Cut(out, "-notify-secret")
	secretHelp, _, _ = strings.Cut(secretHelp, "\n  -")
	secretHelp = strings.Join(strings.Fields(secretHelp), " ")
	for _, want := range []string{signatureHeader + ": sha256=HEX(HMAC-SHA256(secret, body))", "lowercase hex", "request body"} {
		if !strings.Contains(secretHelp, want) {
			t.Errorf("serve -h says of -notify-secret %q; want it to contain %q", secretHelp, want)
		}
	}
	_, urlHelp, _ := strings.Cut(out, "-notify-url")
	urlHelp, _, _ = strings.Cut(urlHelp, "\n  -")
	if !strings.Contains(urlHelp, "-notify-secret") {
		t.Errorf("serve -h says of -notify-url %q; want it to point at -notify-secret", urlHelp)
	}
}

// TestOfflineMissingDataDir: export and import without -server work on an
// existing data directory only: a -data-dir that does not exist (a typo, a
// volume not mounted) is an error naming it, and nothing is created. list
// has no -data-dir (it asks the running server). serve still creates its
// own data directory.
func TestOfflineMissingDataDir(t *testing.T) {
	for _, store := range []string{"file", "bbolt"} {
		for _, args := range [][]string{{"export"}, {"import", "-"}, {"list"}} {
			t.Run(store+" "+args[0], func(t *testing.T) {
				dir := filepath.Join(t.TempDir(), "no", "such", "dir")
				out, errOut, err := runCLI(nil, append(args, "-store", store, "-data-dir", dir)...)
				if err == nil || !strings.Contains(err.Error(), dir) && args[0] != "list" {
					t.Errorf("%s -data-dir %s = %v (stdout %q, stderr %q); want an error naming the directory", args[0], dir, err, out, errOut)
				}
				if _, serr := os.Stat(filepath.Join(dir, "..", "..")); !os.IsNotExist(serr) {
					t.Errorf("%s -data-dir %s created %s (stat: %v)", args[0], dir, filepath.Dir(filepath.Dir(dir)), serr)
				}
			})
		}
	}
	t.Run("a file, not a directory", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "gokv")
		if err := os.WriteFile(path, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, _, err := runCLI(nil, "export", "-data-dir", path); err == nil || !strings.Contains(err.Error(), path) {
			t.Errorf("export -data-dir %s (a file) = %v; want an error naming it", path, err)
		}
	})
	t.Run("an empty directory exports nothing", func(t *testing.T) {
		out, _, err := runCLI(nil, "export", "-data-dir", t.TempDir())
		if err != nil || !strings.Contains(out, `"allocations": []`) {
			t.Errorf("export of an empty directory = %q, %v; want no allocations", out, err)
		}
	})
	t.Run("serve creates its data directory", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "new", "data")
		s := startInProc(t, "-data-dir", dir)
		s.stop(t)
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			t.Errorf("serve -data-dir %s: %v; want the directory created", dir, err)
		}
	})
}

// TestServingLogDataDir: the start line names the data directory as an
// absolute path, however -data-dir gave it; with -store etcd it names no
// data directory but etcd's endpoints and prefix.
func TestServingLogDataDir(t *testing.T) {
	base := t.TempDir()
	t.Chdir(base)
	s := startInProc(t, "-data-dir", "rel/data")
	s.stop(t)
	line := ""
	for l := range strings.Lines(s.log.String()) {
		if strings.Contains(l, "msg=serving") {
			line = l
		}
	}
	abs, err := filepath.EvalSymlinks(base) // what os.Getwd reports for it
	if err != nil {
		t.Fatal(err)
	}
	if want := "data_dir=" + filepath.Join(abs, "rel", "data") + " "; !strings.Contains(line, want) {
		t.Errorf("start line %q; want %q", line, want)
	}

	etcdAttrs := fmt.Sprint(storeLogAttrs(config{store: "etcd", dataDir: "gokv",
		etcd: etcdFlags{endpoints: "http://10.0.0.1:2379,http://10.0.0.2:2379", prefix: "/fpk/"}}))
	if strings.Contains(etcdAttrs, "data_dir") || strings.Contains(etcdAttrs, "gokv") ||
		!strings.Contains(etcdAttrs, "etcd_endpoints http://10.0.0.1:2379,http://10.0.0.2:2379") || !strings.Contains(etcdAttrs, "etcd_prefix /fpk/") {
		t.Errorf("the start line's store attributes with -store etcd = %s; want etcd_endpoints and etcd_prefix, no data_dir", etcdAttrs)
	}
}
