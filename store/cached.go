package store

import (
	"context"
	"database/sql"
	"sync"
)

// cachedDB runs the frequent queries as statements prepared once: SQLite
// parses a query anew at every call otherwise, which the deliverer's and
// the sender's few queries a message paid many times over. database/sql
// prepares each statement again on every connection of the pool that
// runs it, once.
type cachedDB struct {
	db    *sql.DB
	mu    sync.Mutex
	stmts map[string]*sql.Stmt
}

func newCachedDB(db *sql.DB) *cachedDB { return &cachedDB{db: db, stmts: map[string]*sql.Stmt{}} }

// stmt returns query prepared, nil when it cannot be (the call then runs
// it unprepared, and reports its error).
func (c *cachedDB) stmt(ctx context.Context, query string) *sql.Stmt {
	c.mu.Lock()
	defer c.mu.Unlock()
	if st, ok := c.stmts[query]; ok {
		return st
	}
	st, err := c.db.PrepareContext(ctx, query)
	if err != nil {
		return nil
	}
	c.stmts[query] = st
	return st
}

func (c *cachedDB) QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	if st := c.stmt(ctx, query); st != nil {
		return st.QueryContext(ctx, args...)
	}
	return c.db.QueryContext(ctx, query, args...)
}

func (c *cachedDB) QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row {
	if st := c.stmt(ctx, query); st != nil {
		return st.QueryRowContext(ctx, args...)
	}
	return c.db.QueryRowContext(ctx, query, args...)
}

// close closes the statements.
func (c *cachedDB) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for q, st := range c.stmts {
		st.Close()
		delete(c.stmts, q)
	}
}
