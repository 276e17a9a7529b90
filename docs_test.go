package main

import (
	"fmt"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"unicode"
)

// docFiles are the repository's markdown files: README.md and the other
// top-level ones, docs/, bench/ and deploy/.
func docFiles(t *testing.T) []string {
	t.Helper()
	var files []string
	for _, pattern := range []string{"*.md", "docs/*.md", "bench/*.md", "deploy/*.md"} {
		m, err := filepath.Glob(pattern)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, m...)
	}
	sort.Strings(files)
	if len(files) == 0 {
		t.Fatal("no markdown files found")
	}
	return files
}

// mdLink is one inline markdown link: [text](target).
type mdLink struct {
	file   string // the markdown file it is in, slash-separated
	line   int
	text   string
	target string
}

func (l mdLink) String() string {
	return fmt.Sprintf("%s:%d: [%s](%s)", l.file, l.line, l.text, l.target)
}

var (
	linkRE       = regexp.MustCompile(`!?\[([^\]]*)\]\(\s*<?([^)\s>]*)>?(?:\s+"[^"]*")?\s*\)`)
	codeSpanRE   = regexp.MustCompile("(`+)[^`]*?(`+)")
	atxHeadingRE = regexp.MustCompile(`^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$`)
	htmlAnchorRE = regexp.MustCompile(`<a\s+(?:name|id)="([^"]+)"`)
	fenceRE      = regexp.MustCompile("^ {0,3}(```+|~~~+)")
)

// parsedDoc is what one markdown file offers and asks: its heading
// anchors and its links, both outside fenced code blocks.
type parsedDoc struct {
	anchors map[string]bool
	links   []mdLink
}

// parseDoc reads the headings and inline links of one markdown file,
// skipping fenced code blocks and inline code spans.
func parseDoc(name, text string) parsedDoc {
	d := parsedDoc{anchors: map[string]bool{}}
	seen := map[string]int{}
	addHeading := func(h string) {
		slug := githubSlug(h)
		if n, dup := seen[slug]; dup {
			seen[slug] = n + 1
			slug = fmt.Sprintf("%s-%d", slug, n+1)
		} else {
			seen[slug] = 0
		}
		d.anchors[slug] = true
	}
	var fence string
	prev := ""
	lines := strings.Split(text, "\n")
	masked := make([]string, len(lines)) // the text, fenced blocks left blank
	for i, line := range lines {
		if m := fenceRE.FindStringSubmatch(line); m != nil {
			marker := m[1][:3]
			switch {
			case fence == "":
				fence = marker
			case strings.HasPrefix(strings.TrimSpace(line), fence) && strings.Trim(strings.TrimSpace(line), fence[:1]) == "":
				fence = ""
			}
			prev = ""
			continue
		}
		if fence != "" {
			continue
		}
		if m := atxHeadingRE.FindStringSubmatch(line); m != nil {
			addHeading(m[2])
		} else if t := strings.TrimSpace(line); t != "" && prev != "" &&
			(strings.Trim(t, "=") == "" || strings.Trim(t, "-") == "") &&
			!strings.HasPrefix(prev, "|") && !strings.HasPrefix(prev, "-") && !strings.HasPrefix(prev, "*") {
			addHeading(prev) // a setext heading: the line before is its text
		}
		for _, m := range htmlAnchorRE.FindAllStringSubmatch(line, -1) {
			d.anchors[m[1]] = true
		}
		masked[i] = line
		prev = strings.TrimSpace(line)
	}
	// Links and code spans may wrap across lines: look for them in the
	// whole text, fenced blocks blanked out, code spans made plain words
	// (with their line breaks kept, so line numbers stay right).
	plain := codeSpanRE.ReplaceAllStringFunc(strings.Join(masked, "\n"), func(span string) string {
		return "code" + strings.Repeat("\n", strings.Count(span, "\n"))
	})
	for _, m := range linkRE.FindAllStringSubmatchIndex(plain, -1) {
		d.links = append(d.links, mdLink{
			file:   name,
			line:   strings.Count(plain[:m[0]], "\n") + 1,
			text:   strings.Join(strings.Fields(plain[m[2]:m[3]]), " "),
			target: plain[m[4]:m[5]],
		})
	}
	return d
}

// githubSlug is the anchor GitHub gives a heading: its text without
// markup, lowercased, every character but letters, digits, '_', '-' and
// spaces dropped, and spaces turned into hyphens.
func githubSlug(heading string) string {
	// [text](url) counts as its text.
	heading = linkRE.ReplaceAllString(heading, "$1")
	var b strings.Builder
	for _, r := range strings.ToLower(strings.TrimSpace(heading)) {
		switch {
		case r == ' ':
			b.WriteRune('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}

// TestDocLinks: every relative link in the markdown files points at a
// file that exists and, with a #fragment into a markdown file, at a
// heading that file has.
func TestDocLinks(t *testing.T) {
	docs := map[string]parsedDoc{}
	var links []mdLink
	for _, f := range docFiles(t) {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		name := filepath.ToSlash(f)
		d := parseDoc(name, string(b))
		docs[name] = d
		links = append(links, d.links...)
	}
	anchorsOf := func(file string) (map[string]bool, error) {
		if d, ok := docs[file]; ok {
			return d.anchors, nil
		}
		b, err := os.ReadFile(filepath.FromSlash(file))
		if err != nil {
			return nil, err
		}
		d := parseDoc(file, string(b))
		docs[file] = d
		return d.anchors, nil
	}
	checked := 0
	for _, l := range links {
		target := l.target
		lower := strings.ToLower(target)
		if target == "" || strings.HasPrefix(lower, "http://") || strings.HasPrefix(lower, "https://") ||
			strings.HasPrefix(lower, "mailto:") {
			continue
		}
		if u, err := url.Parse(target); err == nil && u.Scheme != "" {
			t.Errorf("%v: a link with scheme %q: only http(s) and mailto links may leave the repository", l, u.Scheme)
			continue
		}
		checked++
		p, frag, _ := strings.Cut(target, "#")
		file := l.file
		if p != "" {
			unescaped, err := url.PathUnescape(p)
			if err != nil {
				t.Errorf("%v: bad escape in the path: %v", l, err)
				continue
			}
			if strings.HasPrefix(unescaped, "/") {
				t.Errorf("%v: an absolute path; links must be relative to the file", l)
				continue
			}
			file = path.Clean(path.Join(path.Dir(l.file), unescaped))
			if strings.HasPrefix(file, "../") || file == ".." {
				t.Errorf("%v: points outside the repository (%s)", l, file)
				continue
			}
			if _, err := os.Stat(filepath.FromSlash(file)); err != nil {
				t.Errorf("%v: %s does not exist", l, file)
				continue
			}
		}
		if frag == "" || !strings.HasSuffix(strings.ToLower(file), ".md") {
			continue
		}
		anchors, err := anchorsOf(file)
		if err != nil {
			t.Errorf("%v: %v", l, err)
			continue
		}
		if !anchors[frag] {
			t.Errorf("%v: %s has no heading with the anchor #%s", l, file, frag)
		}
	}
	if checked == 0 {
		t.Fatal("no relative links found: is the parser broken?")
	}
}

// TestReadmeIsTheDoor: README.md stays the short entry point: the set-up
// commands, and a link to every document in docs/.
func TestReadmeIsTheDoor(t *testing.T) {
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	if n := strings.Count(strings.TrimRight(text, "\n"), "\n") + 1; n > 320 {
		t.Errorf("README.md has %d lines; keep it at most 320 and move reference text to docs/", n)
	}
	for _, want := range []string{"make run", "make test"} {
		if !strings.Contains(text, want) {
			t.Errorf("README.md does not mention %q", want)
		}
	}
	linked := map[string]bool{}
	for _, l := range parseDoc("README.md", text).links {
		p, _, _ := strings.Cut(l.target, "#")
		linked[path.Clean(p)] = true
	}
	docs, err := filepath.Glob("docs/*")
	if err != nil {
		t.Fatal(err)
	}
	if len(docs) == 0 {
		t.Fatal("docs/ is empty")
	}
	for _, d := range docs {
		if !linked[filepath.ToSlash(d)] {
			t.Errorf("README.md does not link to %s: add it to the map of docs/", filepath.ToSlash(d))
		}
	}
}
