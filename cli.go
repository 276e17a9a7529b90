package main

import (
	"bytes"
	"context"
	"encoding/json"
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
	if err := parseCommand(fs, args, getenv); err != nil {
		return err
	}
	c := adminClient{base: strings.TrimRight(*serverURL, "/"), token: *token, http: &http.Client{Timeout: 10 * time.Second}}
	want := map[string]int{"list": 0, "show": 1, "assign": 2, "release": 1}[cmd]
	if fs.NArg() != want {
		usage := map[string]string{"list": "list [-json] [-user U]", "show": "show KEY", "assign": "assign KEY PORT", "release": "release KEY"}[cmd]
		return fmt.Errorf("usage: frp-port-keeper %s", usage)
	}
	switch cmd {
	case "list":
		path := "/api/allocations"
		if *user != "" {
			path += "?user=" + url.QueryEscape(*user)
		}
		var list allocationList
		if err := c.do(ctx, "GET", path, nil, &list); err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, list)
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "PORT\tKEY\tUSER\tTYPE\tCREATED\tLAST SEEN\t")
		for _, a := range list.Allocations {
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
			note := strings.Join(notes, ", ")
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", a.Port, a.Key, dash(a.User), dash(a.ProxyType),
				a.CreatedAt.Local().Format("2006-01-02 15:04"), a.LastSeen.Local().Format("2006-01-02 15:04"), note)
		}
		fmt.Fprintf(tw, "\npool: %d used, %d free, %d ports\n", list.Pool.Used, list.Pool.Free, list.Pool.Size)
		return tw.Flush()
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
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s (%s)", e.Error, resp.Status)
		}
		return fmt.Errorf("server answered %s", resp.Status)
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
	Online   bool      `json:"online,omitempty"`
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
	store, unlock, err := openStore(cfg, nil)
	if err != nil {
		return err
	}
	defer unlock()
	defer store.close()
	ctx := context.Background()
	got, err := store.load(ctx)
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
	now := time.Now().UTC()
	for _, r := range file.Allocations {
		if r.CreatedAt.IsZero() {
			r.CreatedAt = now
		}
		if r.AssignedAt.IsZero() {
			r.AssignedAt = r.CreatedAt
		}
		c := claim{want: r.record, at: now}
		if old, ok := byKey[r.Key]; ok {
			if old.Port == r.Port {
				continue
			}
			c.old = &old
		}
		if _, err := store.claim(ctx, c); err != nil {
			return fmt.Errorf("import %q: %v", r.Key, err)
		}
		if !r.LastSeen.IsZero() {
			if err := store.touch(ctx, []seenMark{{key: r.Key, seen: r.LastSeen}}); err != nil {
				return fmt.Errorf("import %q: %v", r.Key, err)
			}
		}
		imported++
	}
	fmt.Fprintf(stderr, "imported %d allocations into %s (%d already there)\n", imported, cfg.dataDir, len(file.Allocations)-imported)
	return nil
}
