package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// The operator's commands. list, show, assign and release talk to a running
// server over its admin API (so they go through the same allocator, locks
// and store); export and import work on a data directory while no server
// holds it.

// newCommandFlags is a flag set for a subcommand, with env fallbacks like serve's.
func newCommandFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("frp-port-keeper "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// parseCommand parses args and fills unset flags from the environment.
func parseCommand(fs *flag.FlagSet, args []string, getenv func(string) string) error {
	if err := fs.Parse(args); err != nil {
		return err
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
	return err
}

func runClient(ctx context.Context, cmd string, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := newCommandFlags(cmd, stderr)
	serverURL := fs.String("server", "http://127.0.0.1:8080", "address of the running frp-port-keeper")
	token := fs.String("admin-token", "", "admin token of the server")
	asJSON := fs.Bool("json", false, "print JSON")
	user := fs.String("user", "", "list only this user's allocations")
	port := fs.Int("port", 0, "list only the allocation of this port")
	key := fs.String("key", "", "list only the allocation of this key")
	if err := parseCommand(fs, args, getenv); err != nil {
		return err
	}
	c := adminClient{base: strings.TrimRight(*serverURL, "/"), token: *token, http: &http.Client{Timeout: 10 * time.Second}}
	want := map[string]int{"list": 0, "show": 1, "assign": 2, "release": 1}[cmd]
	if fs.NArg() != want {
		usage := map[string]string{"list": "list [-json] [-user U] [-port N] [-key K]", "show": "show KEY", "assign": "assign KEY PORT", "release": "release KEY"}[cmd]
		return fmt.Errorf("usage: frp-port-keeper %s", usage)
	}
	switch cmd {
	case "list":
		filter := url.Values{}
		if *user != "" {
			filter.Set("user", *user)
		}
		if *port != 0 {
			filter.Set("port", strconv.Itoa(*port))
		}
		if *key != "" {
			filter.Set("key", *key)
		}
		return c.list(ctx, filter, *asJSON, stdout)
	case "show":
		var a apiAllocation
		if err := c.do(ctx, "GET", "/api/allocations/"+url.PathEscape(fs.Arg(0)), nil, &a); err != nil {
			return err
		}
		return printJSON(stdout, a)
	case "assign":
		port, err := strconv.Atoi(fs.Arg(1))
		if err != nil {
			return fmt.Errorf("port %q is not a number", fs.Arg(1))
		}
		var a apiAllocation
		if err := c.do(ctx, "PUT", "/api/allocations/"+url.PathEscape(fs.Arg(0)), map[string]int{"port": port}, &a); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%s now holds port %d\n", a.Key, a.Port)
	case "release":
		if err := c.do(ctx, "DELETE", "/api/allocations/"+url.PathEscape(fs.Arg(0)), nil, nil); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "released %s\n", fs.Arg(0))
	}
	return nil
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
		fmt.Fprintln(tw, "PORT\tKEY\tUSER\tTYPE\tCREATED\tLAST SEEN\t")
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
			} else {
				note := ""
				if a.OutsidePolicy {
					note = "outside policy"
				}
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", a.Port, a.Key, dash(a.User), dash(a.ProxyType),
					a.CreatedAt.Local().Format("2006-01-02 15:04"), a.LastSeen.Local().Format("2006-01-02 15:04"), note)
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
		fmt.Fprintf(out, "\npool: %d used, %d free, %d ports\n", pool.Used, pool.Free, pool.Size)
	}
	return out.Flush()
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
	resp, err := c.http.Do(req)
	if err != nil {
		return err
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
	record
	LastSeen time.Time `json:"last_seen,omitzero"`
}

// runStoreTool exports or imports the allocations of a data directory. It
// takes the directory's lock, so it refuses while a server runs on it.
func runStoreTool(cmd string, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := newCommandFlags(cmd, stderr)
	var cfg config
	fs.StringVar(&cfg.dataDir, "data-dir", "gokv", "data directory")
	fs.StringVar(&cfg.store, "store", "file", "store backend: file or bbolt")
	if err := parseCommand(fs, args, getenv); err != nil {
		return err
	}
	if cfg.store != "file" && cfg.store != "bbolt" {
		return fmt.Errorf("-store %q: want file or bbolt", cfg.store)
	}
	store, unlock, err := openStore(cfg)
	if err != nil {
		return err
	}
	defer unlock()
	defer store.close()
	got, err := store.load()
	if err != nil {
		return err
	}
	for _, p := range got.problems {
		fmt.Fprintf(stderr, "store repaired: %s\n", p)
	}
	if cmd == "export" {
		out := exportFile{Allocations: []exportRecord{}}
		for _, r := range got.allocations {
			out.Allocations = append(out.Allocations, exportRecord{record: r, LastSeen: got.lastSeen[r.Key]})
		}
		return printJSON(stdout, out)
	}

	in := io.Reader(os.Stdin)
	if fs.NArg() > 0 && fs.Arg(0) != "-" {
		f, err := os.Open(fs.Arg(0))
		if err != nil {
			return err
		}
		defer f.Close()
		in = f
	}
	var file exportFile
	dec := json.NewDecoder(in)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&file); err != nil {
		return fmt.Errorf("import: %v", err)
	}
	byKey, byPort := map[string]record{}, map[int]string{}
	for _, r := range got.allocations {
		byKey[r.Key], byPort[r.Port] = r, r.Key
	}
	// Check everything before writing anything: an import applies whole or not at all.
	seen := map[string]bool{}
	for _, r := range file.Allocations {
		switch {
		case !validRecord(r.record):
			return fmt.Errorf("import: allocation %q on port %d is not valid", r.Key, r.Port)
		case seen[r.Key]:
			return fmt.Errorf("import: key %q appears twice", r.Key)
		case byPort[r.Port] != "" && byPort[r.Port] != r.Key:
			return fmt.Errorf("import: port %d of %q already belongs to %q", r.Port, r.Key, byPort[r.Port])
		}
		seen[r.Key] = true
		byPort[r.Port] = r.Key
	}
	imported := 0
	for _, r := range file.Allocations {
		if r.CreatedAt.IsZero() {
			r.CreatedAt = time.Now().UTC()
		}
		if r.AssignedAt.IsZero() {
			r.AssignedAt = r.CreatedAt
		}
		var prev *record
		if old, ok := byKey[r.Key]; ok {
			if old.Port == r.Port {
				continue
			}
			prev = &old
		}
		if err := store.claim(r.record, prev); err != nil {
			return fmt.Errorf("import %q: %v", r.Key, err)
		}
		if !r.LastSeen.IsZero() {
			if err := store.touch(r.Key, r.LastSeen); err != nil {
				return fmt.Errorf("import %q: %v", r.Key, err)
			}
		}
		imported++
	}
	fmt.Fprintf(stderr, "imported %d allocations into %s (%d already there)\n", imported, cfg.dataDir, len(file.Allocations)-imported)
	return nil
}
