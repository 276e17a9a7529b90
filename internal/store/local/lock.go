package local

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// LockFile is the data directory's lock; it holds the owner's pid.
const LockFile = ".lock"

// errLocked is what tryLock says when another process holds the lock.
var errLocked = errors.New("locked by another process")

// LockDir takes an exclusive lock on dir that lasts until unlock or until
// the process dies, so a crash never leaves a stale lock behind. The lock
// itself is the platform's (tryLock, in lock_unix.go and lock_windows.go).
func LockDir(dir string) (unlock func(), err error) {
	path := filepath.Join(dir, LockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	readOnly := err != nil && (errors.Is(err, syscall.EROFS) || errors.Is(err, fs.ErrPermission))
	if readOnly {
		// A directory nobody can write: the lock is still taken on the
		// existing file, and without one no writer can start either.
		f, err = os.Open(path)
		if errors.Is(err, fs.ErrNotExist) {
			return func() {}, nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("lock data directory: %v", err)
	}
	if err := tryLock(f); err != nil {
		owner, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, errLocked) {
			pid := strings.TrimSpace(string(owner))
			return nil, fmt.Errorf("data directory %s is in use by another frp-port-keeper (pid %s); one server per directory", dir, pid)
		}
		return nil, fmt.Errorf("lock data directory: %v", err)
	}
	if readOnly {
		return func() { f.Close() }, nil
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return func() { f.Close() }, nil
}
