package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"frp-port-keeper/internal/history"
	"frp-port-keeper/internal/store"
)

// The operator's commands. list, show, assign and release talk to a running
// server over its admin API (so they go through the same allocator, locks
// and store); export and import work on a data directory while no server
// holds it; health asks a server for /ping.

// command is one subcommand: what help says about it, how many arguments
// it takes, and its own flags.
type command struct {
	name    string
	args    string // the arguments after the flags, as help shows them: "KEY PORT"
	minArgs int
	maxArgs int
	summary string // one line in the command list
	about   string // a paragraph in the command's own help
	// setup declares the command's flags on fs and returns what runs the
	// command with its arguments once fs is parsed. It has no other
	// effect, so help can call it to list the flags.
	setup func(fs *flag.FlagSet, e cmdEnv) func(args []string) error
}

// cmdEnv is what a command gets from run.
type cmdEnv struct {
	ctx            context.Context
	getenv         func(string) string
	stdout, stderr io.Writer
}

const serverAbout = "The running server is -server (a URL or host:port), else the server's own FRP_PORT_KEEPER_LISTEN, else " + defaultListen + "."

// commands lists every subcommand in the order help shows them.
func commands() []command {
	return []command{
		{name: "serve", summary: "run the plugin server (the default command)",
			about: "Runs the plugin server: frps asks it on " + pluginPath + " which remote port a proxy gets. The admin API, the web page and the metrics share its listener.",
			setup: setupServe},
		{name: "list", summary: "every allocation of the running server, by port",
			about: "Lists the allocations of the running server, sorted by port; \"outside policy\" marks a sticky port today's policy would not give. " + serverAbout,
			setup: setupList},
		{name: "show", args: "KEY", minArgs: 1, maxArgs: 1, summary: "one allocation as JSON",
			about: "Prints one allocation of the running server as JSON. KEY is the proxy name as frps sends it (user.proxy), or group:NAME for a load-balancing group. " + serverAbout,
			setup: setupShow},
		{name: "assign", args: "KEY PORT", minArgs: 2, maxArgs: 2, summary: "pin a key to a port",
			about: "Pins KEY (new or existing) to PORT on the running server; the key's old port becomes free. The pin wins over the device's own remotePort until you release the key. PORT may lie outside the pool (shown as \"outside pool\"), never on frps's own ports. It takes effect when the device registers again (frpc restarts or reconnects; frpc reload does not re-register). " + serverAbout,
			setup: setupAssign},
		{name: "release", args: "KEY | -port PORT [-proto tcp|udp]", maxArgs: 1, summary: "forget a key; its port becomes free",
			about: "Forgets KEY on the running server; its port becomes free. A device still connected keeps its listener until it registers again (frpc restarts or reconnects), and then gets a port anew. -port PORT frees a port by number: the key that holds it, or a port held back because a crash damaged its record (list shows it as held by an unknown key); when a tcp and a udp key both hold it, -proto tcp or -proto udp says which. " + serverAbout,
			setup: setupRelease},
		{name: "note", args: "KEY TEXT", minArgs: 2, maxArgs: 2, summary: "attach a note to an allocation (\"\" clears it)",
			about: "Sets the note of KEY's allocation on the running server (\"Alice's NAS\"); list, show, the page and export show it, and it stays when the key moves. " + serverAbout,
			setup: setupNote},
		{name: "history", summary: "who held which port when",
			about: "Prints the allocation history of the running server, newest first. -port N -at TIME answers who held port N at that moment (or \"free\"), in tcp and in udp (-proto says one). TIME is 2026-03-03 14:05 (local time), a date, or RFC 3339. " + serverAbout,
			setup: setupHistory},
		{name: "watch", summary: "print every change as it happens",
			about: "Follows the running server's /api/events and prints each allocation change as it happens, until interrupted. When the stream ends or the server cannot be reached (it stopped or restarted) it says so on stderr and reconnects, after 1s and then doubling up to 30s; changes made while it was away are in history. " + serverAbout,
			setup: setupWatch},
		{name: "export", summary: "write every allocation as JSON (from -server, or -data-dir)",
			about: "Writes every allocation as JSON to stdout. With -server, a consistent snapshot from the running server (a backup without downtime); without it, from -data-dir, which must exist and which it refuses while a server holds it.",
			setup: setupStoreTool("export")},
		{name: "import", args: "[FILE]", maxArgs: 1, summary: "read that JSON (default stdin), all or nothing",
			about: "Reads export's JSON from FILE (default, or -, stdin), all or nothing. With -server, through the running server; without it, into -data-dir, which must exist (mkdir a new one) and which it refuses while a server holds it. Ports outside the pool are kept (shown as \"outside pool\"); a port that another key holds, or frps's own, refuses the whole import.",
			setup: setupStoreTool("import")},
		{name: "adopt", summary: "record the ports frps's proxies have now, before enabling the plugin",
			about: "Reads the running frps's dashboard API (address and credentials from -frps-config's webServer section, or -frps-api/-frps-user/-frps-password) and records every online tcp and udp proxy's current remote port as its sticky allocation on the running frp-port-keeper, all or nothing, printing what it adopted and what it could not. Run it before adding the plugin to frps: then enabling the plugin moves no device. " + serverAbout,
			setup: setupAdopt},
		{name: "health", summary: "exit 0 when the server answers /ping, 1 when not",
			about: "Asks the server for /ping and exits 0 when it answers, 1 when not, with one line either way: the container image's HEALTHCHECK. " + serverAbout,
			setup: setupHealth},
		{name: "version", summary: "print the version",
			about: "Prints the version stamped at build time.",
			setup: func(_ *flag.FlagSet, e cmdEnv) func([]string) error {
				return func([]string) error { _, err := fmt.Fprintln(e.stdout, "frp-port-keeper", version); return err }
			}},
		{name: "help", args: "[COMMAND]", maxArgs: 1, summary: "this list, or one command's usage and flags",
			about: "Lists the commands, or shows one command's usage and flags.",
			setup: func(_ *flag.FlagSet, e cmdEnv) func([]string) error {
				return func(args []string) error {
					if len(args) == 0 {
						return printHelp(e.stdout)
					}
					cmd, ok := findCommand(args[0])
					if !ok {
						return unknownCommand(args[0])
					}
					return printUsage(e.stdout, cmd)
				}
			}},
	}
}

func findCommand(name string) (command, bool) {
	for _, c := range commands() {
		if c.name == name {
			return c, true
		}
	}
	return command{}, false
}

func unknownCommand(name string) error {
	return fmt.Errorf("unknown command %q: run 'frp-port-keeper help' for the list", name)
}

// runCommand runs the named command. implicit is a serve that was not
// named: its -h shows the whole help, as `frp-port-keeper -h` should.
func runCommand(name string, implicit bool, args []string, e cmdEnv) error {
	cmd, ok := findCommand(name)
	if !ok {
		return unknownCommand(name)
	}
	invocation := "frp-port-keeper " + name
	if implicit {
		invocation = "frp-port-keeper"
	}
	fs := newFlagSet(invocation)
	exec := cmd.setup(fs, e)
	pos, err := parseArgs(fs, args, e.getenv)
	switch {
	case errors.Is(err, flag.ErrHelp) && implicit:
		return printHelp(e.stdout)
	case errors.Is(err, flag.ErrHelp):
		return printUsage(e.stdout, cmd)
	case err != nil:
		return err
	case len(pos) < cmd.minArgs:
		return fmt.Errorf("%s needs %s (usage: %s)", name, strings.Fields(cmd.args)[len(pos)], usageLine(cmd))
	case len(pos) > cmd.maxArgs:
		return fmt.Errorf("unexpected argument %q (usage: %s)", pos[cmd.maxArgs], usageLine(cmd))
	}
	return exec(pos)
}

// newFlagSet is a flag set that prints nothing itself: run decides what
// goes where (help to stdout, one line per error).
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	return fs
}

// parseArgs parses flags wherever they stand among the arguments
// ("release KEY -server URL" as well as "release -server URL KEY"; after
// "--" everything is an argument), then fills every flag not given from its
// environment variable. It returns the arguments.
func parseArgs(fs *flag.FlagSet, args []string, getenv func(string) string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, fmt.Errorf("%v (run '%s -h' for usage)", err, fs.Name())
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			pos = append(pos, rest...)
			break
		}
		pos, args = append(pos, rest[0]), rest[1:]
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if v := getenv(envName(f.Name)); v != "" && !given[f.Name] && err == nil {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s=%q: %v", envName(f.Name), v, e)
			}
		}
	})
	return pos, err
}

// usageLine is a command's synopsis.
func usageLine(cmd command) string {
	line := "frp-port-keeper " + cmd.name
	if cmd.name == "serve" {
		line = "frp-port-keeper [serve]"
	}
	if hasFlags(cmd) {
		line += " [flags]"
	}
	if cmd.args != "" {
		line += " " + cmd.args
	}
	return line
}

func hasFlags(cmd command) bool {
	fs := newFlagSet(cmd.name)
	cmd.setup(fs, cmdEnv{})
	n := 0
	fs.VisitAll(func(*flag.Flag) { n++ })
	return n > 0
}

// printHelp is `frp-port-keeper help`: the commands, then serve's flags,
// since serve is what runs without a command.
func printHelp(w io.Writer) error {
	var b strings.Builder
	b.WriteString("frp-port-keeper is an frps server plugin that gives every tcp and udp proxy\n" +
		"the same remote port on every connection.\n\n" +
		"usage: frp-port-keeper [COMMAND] [flags] [ARGS]\n\ncommands:\n")
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	for _, c := range commands() {
		fmt.Fprintf(tw, "  %s\t%s\n", strings.TrimSpace(c.name+" "+c.args), c.summary)
	}
	tw.Flush()
	b.WriteString("\nFlags may come before or after the arguments. Every flag can also be set in\n" +
		"the environment: -data-dir as " + envName("data-dir") + ", and so on.\n" +
		"Run 'frp-port-keeper help COMMAND' (or COMMAND -h) for a command's own flags.\n\nflags of serve:\n")
	serve, _ := findCommand("serve")
	writeFlags(&b, serve)
	_, err := io.WriteString(w, b.String())
	return err
}

// printUsage is one command's help: its synopsis, what it does, its flags.
func printUsage(w io.Writer, cmd command) error {
	var b strings.Builder
	fmt.Fprintf(&b, "usage: %s\n\n%s\n", usageLine(cmd), wrap(cmd.about, 76))
	if hasFlags(cmd) {
		fs := newFlagSet(cmd.name)
		cmd.setup(fs, cmdEnv{})
		var first string
		fs.VisitAll(func(f *flag.Flag) {
			if first == "" {
				first = f.Name
			}
		})
		fmt.Fprintf(&b, "\nflags (each also from the environment, e.g. -%s as %s):\n", first, envName(first))
		writeFlags(&b, cmd)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// writeFlags writes a command's flags as the flag package prints them.
func writeFlags(w io.Writer, cmd command) {
	fs := newFlagSet(cmd.name)
	cmd.setup(fs, cmdEnv{})
	fs.SetOutput(w)
	fs.PrintDefaults()
}

// wrap breaks text into lines of at most width bytes, at spaces.
func wrap(text string, width int) string {
	var b strings.Builder
	n := 0
	for _, word := range strings.Fields(text) {
		if n > 0 && n+1+len(word) > width {
			b.WriteByte('\n')
			n = 0
		} else if n > 0 {
			b.WriteByte(' ')
			n++
		}
		b.WriteString(word)
		n += len(word)
	}
	return b.String()
}

// setupServe declares serve's flags; running it checks them and serves.
func setupServe(fs *flag.FlagSet, e cmdEnv) func([]string) error {
	var c config
	c.declare(fs)
	return func([]string) error {
		if c.version {
			_, err := fmt.Fprintln(e.stdout, "frp-port-keeper", version)
			return err
		}
		if err := c.check(); err != nil {
			return err
		}
		return serve(e.ctx, c, e.stderr)
	}
}

// clientFlags are the flags of every command that talks to a running server.
type clientFlags struct {
	server, token string
}

func (f *clientFlags) declare(fs *flag.FlagSet) {
	fs.StringVar(&f.server, "server", "", "the running server: URL or host:port (default $"+envName("listen")+", else "+defaultListen+")")
	fs.StringVar(&f.token, "admin-token", "", "the server's admin token")
}

// client is the admin client for the server the flags and environment name.
func (f *clientFlags) client(getenv func(string) string) (adminClient, error) {
	base, err := serverBase(f.server, getenv)
	if err != nil {
		return adminClient{}, err
	}
	return adminClient{base: base, token: f.token, http: &http.Client{Timeout: 10 * time.Second}}, nil
}

// serverBase is the base URL of the server the client commands talk to:
// the -server flag (or FRP_PORT_KEEPER_SERVER), else the server's own
// FRP_PORT_KEEPER_LISTEN, else the default listen address. A host:port
// gets http:// (https:// when it comes from FRP_PORT_KEEPER_LISTEN and
// FRP_PORT_KEEPER_TLS_CERT is set, as the server then serves TLS), and an
// unspecified host (":8080", "0.0.0.0:8080") means this host.
func serverBase(server string, getenv func(string) string) (string, error) {
	scheme := "http"
	if server == "" {
		server = getenv(envName("listen"))
		if server != "" && getenv(envName("tls-cert")) != "" {
			scheme = "https"
		}
	}
	if server == "" {
		server = defaultListen
	}
	if !strings.Contains(server, "://") {
		host, port, err := net.SplitHostPort(server)
		if err != nil {
			host, port = server, ""
		}
		if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
			host = "127.0.0.1"
			if ip != nil && ip.To4() == nil {
				host = "::1"
			}
		}
		if port != "" {
			host = net.JoinHostPort(host, port)
		} else if strings.Contains(host, ":") {
			host = "[" + host + "]"
		}
		server = scheme + "://" + host
	}
	u, err := url.Parse(server)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", fmt.Errorf("-server %q: want a URL (http://127.0.0.1:8080) or host:port", server)
	}
	return strings.TrimRight(server, "/"), nil
}

func setupList(fs *flag.FlagSet, e cmdEnv) func([]string) error {
	asJSON := fs.Bool("json", false, "print JSON")
	user := fs.String("user", "", "list only this user's allocations")
	port := fs.Int("port", 0, "list only the allocations of this port (its tcp and its udp one)")
	proto := fs.String("proto", "", "tcp or udp: list only ports of this protocol")
	key := fs.String("key", "", "list only the allocation of this key")
	return withClient(fs, e, func(c adminClient, _ []string) error {
		filter := url.Values{}
		if _, err := store.ParseSpace(*proto); err != nil {
			return fmt.Errorf("-proto: %v", err)
		}
		if *proto != "" {
			filter.Set("proto", *proto)
		}
		if *user != "" {
			filter.Set("user", *user)
		}
		if *port != 0 {
			filter.Set("port", strconv.Itoa(*port))
		}
		if *key != "" {
			filter.Set("key", *key)
		}
		return c.list(e.ctx, filter, *asJSON, e.stdout)
	})
}

// listPageSize is how many allocations list asks the server for at a time.
const listPageSize = 1000

// list prints the allocations filter selects, a page at a time as they
// arrive (following the server's cursor), so neither side ever holds the
// whole list: a table, flushed after every page, or the JSON of
// GET /api/allocations, indented as printJSON would.
func (c adminClient) list(ctx context.Context, filter url.Values, asJSON bool, stdout io.Writer) error {
	out := bufio.NewWriter(stdout)
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	if asJSON {
		fmt.Fprint(out, "{\n  \"allocations\": [")
	} else {
		fmt.Fprintln(tw, "PORT\tPROTO\tKEY\tUSER\tTYPE\tCREATED\tLAST SEEN\tNOTES")
	}
	rows, after := 0, 0
	var pool poolStats
	for {
		q := url.Values{}
		for k, v := range filter {
			q[k] = v
		}
		q.Set("limit", strconv.Itoa(listPageSize))
		if after > 0 {
			q.Set("after", strconv.Itoa(after))
		}
		var page allocationList
		if err := c.doRetrying(ctx, "GET", "/api/allocations?"+q.Encode(), &page); err != nil {
			return err
		}
		for _, a := range page.Allocations {
			if asJSON {
				b, err := json.MarshalIndent(a, "    ", "  ")
				if err != nil {
					return err
				}
				if rows > 0 {
					out.WriteByte(',')
				}
				fmt.Fprintf(out, "\n    %s", b)
			} else if a.HeldBack != "" {
				fmt.Fprintf(tw, "%d\t%s\t(unknown)\t-\t-\t-\t-\t%s\n", a.Port, dash(string(a.Proto)), listNotes(a))
			} else {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", a.Port, dash(string(a.Proto)), a.Key, dash(a.User), dash(a.ProxyType),
					a.CreatedAt.Local().Format("2006-01-02 15:04"), a.LastSeen.Local().Format("2006-01-02 15:04"), listNotes(a))
			}
			rows++
		}
		pool = page.Pool
		if !asJSON {
			tw.Flush()
		}
		if err := out.Flush(); err != nil {
			return err
		}
		if page.Next == 0 {
			break
		}
		after = page.Next
	}
	if asJSON {
		if rows > 0 {
			out.WriteString("\n  ")
		}
		b, err := json.MarshalIndent(pool, "  ", "  ")
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "],\n  \"pool\": %s\n}\n", b)
	} else {
		fmt.Fprintf(out, "\npool: %d used, %d free, %d ports", pool.Used, pool.Free, pool.Size)
		if pool.TCP != nil && pool.UDP != nil {
			fmt.Fprintf(out, " (tcp %d used of %d, udp %d used of %d)", pool.TCP.Used, pool.TCP.Size, pool.UDP.Used, pool.UDP.Size)
		}
		fmt.Fprintln(out)
	}
	return out.Flush()
}

// listNotes is the NOTES column of list.
func listNotes(a apiAllocation) string {
	var notes []string
	if a.Pinned {
		notes = append(notes, "pinned")
	}
	if a.OutsidePool {
		notes = append(notes, "outside pool")
	}
	if a.OutsidePolicy {
		notes = append(notes, "outside policy")
	}
	if a.Note != "" {
		notes = append(notes, strconv.Quote(a.Note))
	}
	if a.HeldBack != "" {
		notes = append(notes, "held back: "+a.HeldBack)
	}
	return strings.Join(notes, ", ")
}

// doRetrying is do for a GET that a busy server may refuse for a moment
// (503 with Retry-After, when every listing slot is taken): it tries again,
// up to five times, after the delay the server asks for (at most 5s).
func (c adminClient) doRetrying(ctx context.Context, method, path string, out any) error {
	for attempt := 1; ; attempt++ {
		err := c.do(ctx, method, path, nil, out)
		var se *statusError
		if !errors.As(err, &se) || se.status != http.StatusServiceUnavailable || se.retryAfter <= 0 || attempt == 5 {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(min(se.retryAfter, 5*time.Second)):
		}
	}
}

// statusError is an answer of the admin API other than a success.
type statusError struct {
	status     int
	retryAfter time.Duration // from Retry-After, when the server sent one
	msg        string
}

func (e *statusError) Error() string { return e.msg }

func setupShow(fs *flag.FlagSet, e cmdEnv) func([]string) error {
	return withClient(fs, e, func(c adminClient, args []string) error {
		var a apiAllocation
		if err := c.do(e.ctx, "GET", "/api/allocations/"+url.PathEscape(args[0]), nil, &a); err != nil {
			return err
		}
		return printJSON(e.stdout, a)
	})
}

func setupAssign(fs *flag.FlagSet, e cmdEnv) func([]string) error {
	var note optionalString
	fs.Var(&note, "note", "a note for the allocation (\"Alice's NAS\")")
	proto := fs.String("proto", "", "tcp or udp: the port's protocol, for a key not seen yet (default tcp; a known key's is its proxy's)")
	return withClient(fs, e, func(c adminClient, args []string) error {
		port, err := strconv.Atoi(args[1])
		if err != nil {
			return fmt.Errorf("port %q is not a number (usage: frp-port-keeper assign [flags] KEY PORT)", args[1])
		}
		if _, err := store.ParseSpace(*proto); err != nil {
			return fmt.Errorf("-proto: %v", err)
		}
		body := map[string]any{"port": port}
		if *proto != "" {
			body["proto"] = *proto
		}
		if note.set {
			body["note"] = note.value
		}
		var a apiAllocation
		if err := c.do(e.ctx, "PUT", "/api/allocations/"+url.PathEscape(args[0]), body, &a); err != nil {
			return err
		}
		_, err = fmt.Fprintf(e.stdout, "%s now holds port %s (pinned); the device gets it when it registers again (frpc restart or reconnect)\n",
			a.Key, portName(store.Slot{Space: a.Proto, Port: a.Port}))
		return err
	})
}

func setupRelease(fs *flag.FlagSet, e cmdEnv) func([]string) error {
	port := fs.Int("port", 0, "free this port instead of naming a key: its key's, or one held back by a damaged record")
	proto := fs.String("proto", "", "with -port: tcp or udp, needed when both a tcp and a udp key hold the port")
	return withClient(fs, e, func(c adminClient, args []string) error {
		space, err := store.ParseSpace(*proto)
		switch {
		case err != nil:
			return fmt.Errorf("-proto: %v", err)
		case *port != 0 && len(args) > 0:
			return errors.New("give KEY or -port PORT, not both")
		case space != "" && *port == 0:
			return errors.New("-proto goes with -port")
		case *port != 0:
			path := "/api/ports/" + strconv.Itoa(*port)
			if space != "" {
				path += "?proto=" + string(space)
			}
			if err := c.do(e.ctx, "DELETE", path, nil, nil); err != nil {
				return err
			}
			name := strconv.Itoa(*port)
			if space != "" {
				name = store.Slot{Space: space, Port: *port}.String()
			}
			_, err := fmt.Fprintf(e.stdout, "released port %s; it is free\n", name)
			return err
		case len(args) == 0:
			return errors.New("missing KEY (or -port PORT)")
		}
		if err := c.do(e.ctx, "DELETE", "/api/allocations/"+url.PathEscape(args[0]), nil, nil); err != nil {
			return err
		}
		_, err = fmt.Fprintf(e.stdout, "released %s; its port is free. A device still connected keeps listening until it registers again\n", args[0])
		return err
	})
}

// withClient declares the flags every command that talks to a running
// server has, and runs fn with the client they name.
func withClient(fs *flag.FlagSet, e cmdEnv, fn func(c adminClient, args []string) error) func([]string) error {
	var cf clientFlags
	cf.declare(fs)
	return func(args []string) error {
		c, err := cf.client(e.getenv)
		if err != nil {
			return err
		}
		return fn(c, args)
	}
}

// optionalString is a string flag that knows whether it was given.
type optionalString struct {
	value string
	set   bool
}

func (o *optionalString) String() string     { return o.value }
func (o *optionalString) Set(v string) error { o.value, o.set = v, true; return nil }

func setupNote(fs *flag.FlagSet, e cmdEnv) func([]string) error {
	return withClient(fs, e, func(c adminClient, args []string) error {
		var a apiAllocation
		if err := c.do(e.ctx, "PATCH", "/api/allocations/"+url.PathEscape(args[0]), map[string]string{"note": args[1]}, &a); err != nil {
			return err
		}
		_, err := fmt.Fprintf(e.stdout, "%s (port %d): note %q\n", a.Key, a.Port, a.Note)
		return err
	})
}

func setupHistory(fs *flag.FlagSet, e cmdEnv) func([]string) error {
	port := fs.Int("port", 0, "only changes of this port")
	proto := fs.String("proto", "", "tcp or udp: only changes of ports of this protocol (default both)")
	key := fs.String("key", "", "only changes of this key")
	user := fs.String("user", "", "only changes of this user's keys")
	since := fs.String("since", "", "only changes at or after this time")
	until := fs.String("until", "", "only changes at or before this time")
	at := fs.String("at", "", "with -port: who held the port at this time")
	limit := fs.Int("limit", 50, "at most this many changes")
	asJSON := fs.Bool("json", false, "print JSON")
	return withClient(fs, e, func(c adminClient, _ []string) error {
		q := url.Values{}
		if *port != 0 {
			q.Set("port", strconv.Itoa(*port))
		}
		if _, err := store.ParseSpace(*proto); err != nil {
			return fmt.Errorf("-proto: %v", err)
		}
		for name, v := range map[string]string{"key": *key, "user": *user, "proto": *proto} {
			if v != "" {
				q.Set(name, v)
			}
		}
		now := time.Now()
		for name, v := range map[string]string{"since": *since, "until": *until, "at": *at} {
			if v == "" {
				continue
			}
			t, err := parseWhen(v, now)
			if err != nil {
				return fmt.Errorf("-%s: %v", name, err)
			}
			q.Set(name, t.Format(time.RFC3339Nano))
		}
		if *at != "" {
			if *port == 0 {
				return errors.New("-at needs -port: who held which port at that time")
			}
			var ans portAt
			if err := c.do(e.ctx, "GET", "/api/history?"+q.Encode(), nil, &ans); err != nil {
				return err
			}
			if *asJSON {
				return printJSON(e.stdout, ans)
			}
			answers := []portAt{ans}
			if ans.UDP != nil {
				answers = append(answers, *ans.UDP)
			}
			for _, ans := range answers {
				when := ans.At.Local().Format("2006-01-02 15:04:05 MST")
				slot := store.Slot{Space: cmp.Or(ans.Proto, store.TCP), Port: ans.Port}
				switch {
				case ans.Held:
					fmt.Fprintf(e.stdout, "port %s at %s: %s (user %s)\n", slot, when, ans.Key, dash(ans.User))
				case ans.Known:
					fmt.Fprintf(e.stdout, "port %s at %s: free\n", slot, when)
				default:
					fmt.Fprintf(e.stdout, "port %s at %s: free (no record of it before then)\n", slot, when)
				}
				if ans.Entry != nil {
					fmt.Fprintf(e.stdout, "  since: %s\n", history.Describe(*ans.Entry))
				}
			}
			return nil
		}
		var page historyPage
		q.Set("limit", strconv.Itoa(max(1, min(*limit, 1000))))
		if err := c.do(e.ctx, "GET", "/api/history?"+q.Encode(), nil, &page); err != nil {
			return err
		}
		if *asJSON {
			return printJSON(e.stdout, page)
		}
		for _, en := range page.Entries {
			fmt.Fprintln(e.stdout, history.Describe(en))
		}
		if len(page.Entries) == 0 {
			fmt.Fprintln(e.stdout, "no changes match")
		}
		return nil
	})
}

// watchBackoff is how long watch waits before it reconnects: from 1s,
// doubling up to 30s while the server stays away.
func watchBackoff(attempt int) time.Duration {
	return min(time.Second<<min(attempt, 5), 30*time.Second)
}

func setupWatch(fs *flag.FlagSet, e cmdEnv) func([]string) error {
	asJSON := fs.Bool("json", false, "print each change as a JSON line")
	return withClient(fs, e, func(c adminClient, _ []string) error {
		var outErr error // stdout failed: nobody reads what watch prints
		show := func(en store.HistoryEntry, raw []byte) error {
			if *asJSON {
				_, outErr = fmt.Fprintf(e.stdout, "%s\n", raw)
			} else {
				_, outErr = fmt.Fprintln(e.stdout, history.Describe(en))
			}
			return outErr
		}
		// A stream ends when the server stops or restarts, or the network
		// drops it: watch keeps following until it is interrupted, and
		// says on stderr where its output has a gap.
		var lostAt time.Time
		for attempt := 0; ; attempt++ {
			opened, err := followEvents(e.ctx, c, func() {
				if !lostAt.IsZero() {
					fmt.Fprintf(e.stderr, "reconnected to %s; changes made meanwhile: frp-port-keeper history -since %q\n",
						c.base, lostAt.Format("2006-01-02 15:04:05"))
				}
			}, show)
			if e.ctx.Err() != nil {
				return nil
			}
			if outErr != nil {
				return outErr
			}
			var se *statusError
			if errors.As(err, &se) && se.status != http.StatusServiceUnavailable && se.status < 500 {
				return err // a wrong token or server: waiting does not fix it
			}
			if opened {
				attempt, lostAt = 0, time.Now()
				why := "the server ended the stream: it stopped or restarted"
				if err != nil {
					why = err.Error()
				}
				err = fmt.Errorf("connection lost (%s)", why)
			}
			wait := watchBackoff(attempt)
			fmt.Fprintf(e.stderr, "%v; reconnecting in %v\n", err, wait)
			select {
			case <-e.ctx.Done():
				return nil
			case <-time.After(wait):
			}
		}
	})
}

// followEvents reads c's /api/events until the stream ends, calling open
// once it is open and fn for each change. opened says whether it was.
func followEvents(ctx context.Context, c adminClient, open func(), fn func(store.HistoryEntry, []byte) error) (opened bool, err error) {
	req, err := http.NewRequestWithContext(ctx, "GET", c.base+"/api/events", nil)
	if err != nil {
		return false, err
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := (&http.Client{}).Do(req) // no timeout: a stream
	if err != nil {
		return false, unreachable(c.base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		se := &statusError{status: resp.StatusCode, msg: "server answered " + resp.Status}
		var body struct {
			Error string `json:"error"`
		}
		if json.NewDecoder(io.LimitReader(resp.Body, 4<<10)).Decode(&body) == nil && body.Error != "" {
			se.msg = fmt.Sprintf("%s (%s)", body.Error, resp.Status)
		}
		return false, se
	}
	open()
	return true, readEvents(resp.Body, fn)
}

// readEvents reads a server-sent event stream, calling fn for each
// change, until the stream ends.
func readEvents(r io.Reader, fn func(store.HistoryEntry, []byte) error) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		data, ok := bytes.CutPrefix(sc.Bytes(), []byte("data: "))
		if !ok {
			continue
		}
		var en store.HistoryEntry
		if err := json.Unmarshal(data, &en); err != nil {
			continue
		}
		if err := fn(en, data); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// healthTimeout bounds health's whole check, below Docker's default
// HEALTHCHECK timeout.
const healthTimeout = 5 * time.Second

func setupHealth(fs *flag.FlagSet, e cmdEnv) func([]string) error {
	server := fs.String("server", "", "the server to check: URL or host:port (default $"+envName("listen")+", else "+defaultListen+")")
	return func([]string) error {
		base, err := serverBase(*server, e.getenv)
		if err != nil {
			return err
		}
		return checkHealth(e.ctx, base, e.stdout)
	}
}

// checkHealth GETs base/ping. Over HTTPS to a loopback address it does not
// verify the certificate, which names the host frps dials rather than
// 127.0.0.1: it sends nothing secret and only wants "pong" back.
func checkHealth(ctx context.Context, base string, stdout io.Writer) error {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	if u, err := url.Parse(base); err == nil && u.Scheme == "https" {
		if ip := net.ParseIP(u.Hostname()); ip != nil && ip.IsLoopback() || u.Hostname() == "localhost" {
			transport.TLSClientConfig = &tls.Config{InsecureSkipVerify: true}
		}
	}
	defer transport.CloseIdleConnections()
	client := &http.Client{Timeout: healthTimeout, Transport: transport}
	req, err := http.NewRequestWithContext(ctx, "GET", base+"/ping", nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return unreachable(base, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64))
	if resp.StatusCode != http.StatusOK || string(body) != "pong" {
		return fmt.Errorf("%s/ping answered %s %q, not 200 pong: is frp-port-keeper the server there? set -server", base, resp.Status, body)
	}
	_, err = fmt.Fprintf(stdout, "ok: frp-port-keeper at %s answers /ping\n", base)
	return err
}

// unreachable is a failed connection to a server as a sentence with the fix.
func unreachable(base string, err error) error {
	var dnsErr *net.DNSError
	var netErr net.Error
	reason := ""
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		reason = "connection refused"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		reason = "the connection was closed without an answer"
	case errors.As(err, &dnsErr):
		reason = "no such host " + dnsErr.Name
	case errors.As(err, &netErr) && netErr.Timeout(), errors.Is(err, context.DeadlineExceeded):
		reason = "timed out"
	default:
		for {
			next := errors.Unwrap(err)
			if next == nil {
				break
			}
			err = next
		}
		reason = err.Error()
	}
	return fmt.Errorf("cannot reach frp-port-keeper at %s (%s): is it running? set -server", base, reason)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// adminClient calls a running server's admin API.
type adminClient struct {
	base, token string
	http        *http.Client
}

func (c adminClient) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, _ := json.Marshal(in)
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return err
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	req.Header.Set("X-Frp-Port-Keeper-Client", "cli")
	resp, err := c.http.Do(req)
	if err != nil {
		return unreachable(c.base, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode >= 300 {
		se := &statusError{status: resp.StatusCode, msg: "server answered " + resp.Status}
		if secs, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && secs > 0 {
			se.retryAfter = time.Duration(secs) * time.Second
		}
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			se.msg = fmt.Sprintf("%s (%s)", e.Error, resp.Status)
		}
		return se
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}

// exportFile is the format of export and import: every allocation with its
// last_seen, readable and editable by a person.
type exportFile struct {
	Allocations []exportRecord `json:"allocations"`
}

type exportRecord struct {
	store.Record
	LastSeen time.Time `json:"last_seen,omitzero"`
	Online   bool      `json:"online,omitempty"`
}

// setupStoreTool declares the flags of export or import; running it
// exports or imports the allocations of a data directory. It takes the
// directory's lock, so it refuses while a server runs on it.
func setupStoreTool(cmd string) func(fs *flag.FlagSet, e cmdEnv) func([]string) error {
	return func(fs *flag.FlagSet, e cmdEnv) func([]string) error {
		var cfg config
		cfg.declareStore(fs)
		if cmd == "import" {
			// The server's checks need frps's ports and the pool; as flags
			// (and from the server's environment) they read as serve's do.
			fs.StringVar(&cfg.frpsConfig, "frps-config", "", "without -server: frps config file; frps's own ports are refused, as the server refuses them")
			fs.StringVar(&cfg.allowPorts, "allow-ports", "", "without -server: the server's pool, to say which imported ports lie outside it (default "+defaultPool+")")
		}
		server := fs.String("server", "", "work through this running server (URL or host:port) instead of -data-dir")
		token := fs.String("admin-token", "", "the server's admin token, with -server")
		return func(args []string) error {
			if *server != "" {
				cf := clientFlags{server: *server, token: *token}
				c, err := cf.client(e.getenv)
				if err != nil {
					return err
				}
				return runRemoteStoreTool(e.ctx, cmd, c, args, e.stdout, e.stderr)
			}
			return runStoreTool(cmd, cfg, args, e.stdout, e.stderr)
		}
	}
}

// runRemoteStoreTool exports or imports through a running server.
func runRemoteStoreTool(ctx context.Context, cmd string, c adminClient, args []string, stdout, stderr io.Writer) error {
	if cmd == "export" {
		var out exportFile
		if err := c.do(ctx, "GET", "/api/export", nil, &out); err != nil {
			return err
		}
		return printJSON(stdout, out)
	}
	file, err := readExportFile(args)
	if err != nil {
		return err
	}
	var res importResult
	if err := c.do(ctx, "POST", "/api/import", file, &res); err != nil {
		return fmt.Errorf("import: %v (nothing imported)", err)
	}
	warnOutsidePool(stderr, res)
	_, err = fmt.Fprintf(stderr, "imported %d allocations through %s (%d already there)\n", res.Imported, c.base, res.Unchanged)
	return err
}

// warnOutsidePool says which imported allocations lie outside the pool.
func warnOutsidePool(w io.Writer, res importResult) {
	for _, kp := range res.OutsidePool {
		fmt.Fprintf(w, "note: %s is outside the pool %s: kept as an operator's choice (shown as \"outside pool\")\n", kp, res.Pool)
	}
}

// readExportFile reads export's JSON from the file args name, or stdin.
func readExportFile(args []string) (exportFile, error) {
	in := io.Reader(os.Stdin)
	if len(args) > 0 && args[0] != "-" {
		f, err := os.Open(args[0])
		if err != nil {
			return exportFile{}, err
		}
		defer f.Close()
		in = f
	}
	var file exportFile
	dec := json.NewDecoder(in)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&file); err != nil {
		return file, fmt.Errorf("import: %v", err)
	}
	return file, nil
}

// runStoreTool exports or imports the allocations of cfg's data directory.
func runStoreTool(cmd string, cfg config, args []string, stdout, stderr io.Writer) error {
	if err := cfg.checkStore(); err != nil {
		return err
	}
	if cfg.store != "etcd" {
		if err := existingDataDir(cfg.dataDir); err != nil {
			return err
		}
	}
	if cfg.storeTimeout <= 0 {
		cfg.storeTimeout = 2 * time.Second
	}
	if cmd == "import" {
		return importOffline(cfg, args, stderr)
	}
	st, unlock, err := openStore(cfg, nil)
	if err != nil {
		return err
	}
	defer unlock()
	defer st.Close()
	got, err := st.Load(context.Background())
	if err != nil {
		return err
	}
	for _, p := range got.Problems {
		fmt.Fprintf(stderr, "store repaired: %s\n", p)
	}
	out := exportFile{Allocations: []exportRecord{}}
	for _, r := range got.Allocations {
		out.Allocations = append(out.Allocations, exportRecord{Record: r, LastSeen: got.LastSeen[r.Key]})
	}
	return printJSON(stdout, out)
}

// existingDataDir checks that the data directory export or import works on
// is there. Opening a store creates its directory, which serve wants and
// an offline command does not: a mistyped -data-dir, or a volume not
// mounted, would export nothing or import into a directory no server reads.
func existingDataDir(dir string) error {
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("-data-dir %s: no such directory (export and import without -server work on the data directory of a stopped server; they create none)", dir)
	case err != nil:
		return fmt.Errorf("-data-dir: %v", err)
	case !fi.IsDir():
		return fmt.Errorf("-data-dir %s: not a directory", dir)
	}
	return nil
}

// importOffline imports an export file into cfg's store with no server
// running, through the allocator's importAll as POST /api/import does: the
// same checks (frps's ports, held ports, notes), all or nothing, with the
// history written before the store closes.
func importOffline(cfg config, args []string, stderr io.Writer) error {
	// The server's own listening port is not known offline: only an
	// import through the server refuses a key on it.
	plan, err := planPool(cfg, 0)
	if err != nil {
		return err
	}
	file, err := readExportFile(args)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	st, unlock, err := openStore(cfg, log)
	if err != nil {
		return err
	}
	defer unlock()
	defer st.Close()
	recorder := history.NewRecorder(st.History(), log, nil, nil)
	defer recorder.Stop() // before the store closes
	alloc, got, err := newAllocator(st, plan.pool, allocatorOptions{excluded: plan.excluded, storeTimeout: cfg.storeTimeout,
		log: log, changed: recorder.Record})
	if err != nil {
		return err
	}
	for _, p := range got.Problems {
		fmt.Fprintf(stderr, "store repaired: %s\n", p)
	}
	recs := make([]store.Record, 0, len(file.Allocations))
	var seen []store.SeenMark // last_seen of the allocations this import writes
	for _, r := range file.Allocations {
		recs = append(recs, r.Record)
		if cur, ok := alloc.current(r.Key); !r.LastSeen.IsZero() && (!ok || cur.Slot() != r.Slot()) {
			seen = append(seen, store.SeenMark{Key: validUTF8(r.Key), Seen: r.LastSeen})
		}
	}
	n, err := alloc.importAll(recs, store.HistImported, "import -data-dir")
	if err != nil {
		return fmt.Errorf("import: %v (nothing imported)", err)
	}
	for i := 0; i < len(seen); i += 256 {
		ctx, cancel := context.WithTimeout(context.Background(), cfg.storeTimeout)
		err := st.Touch(ctx, seen[i:min(i+256, len(seen))])
		cancel()
		if err != nil {
			fmt.Fprintf(stderr, "the imported last_seen times were not all written (they only order reclaims): %v\n", err)
			break
		}
	}
	warnOutsidePool(stderr, alloc.importSummary(recs, n))
	where := cfg.dataDir
	if cfg.store == "etcd" {
		where = "etcd " + cfg.etcd.endpoints
	}
	_, err = fmt.Fprintf(stderr, "imported %d allocations into %s (%d already there)\n", n, where, len(recs)-n)
	return err
}
