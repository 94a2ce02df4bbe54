package store

import (
	"context"
	"fmt"
	"slices"
)

// DumpTables are the tables Rows reads: everything a store holds but its
// journal files and their digests (JournalDigests).
var DumpTables = []string{"messages", "pending", "quarantine", "alerts", "state", "reports"}

// Rows calls fn with every row of table (one of DumpTables), in the order
// the rows were written, each column by name as SQLite gives it (int64,
// string, []byte or nil; times are Unix microseconds, 0 for none): what
// moving the store into another database reads.
func (s *Store) Rows(ctx context.Context, table string, fn func(row map[string]any) error) error {
	if !slices.Contains(DumpTables, table) {
		return fmt.Errorf("store: no table %q to read", table)
	}
	if err := s.waitIngested(ctx); err != nil {
		return err
	}
	rows, err := s.db.QueryContext(ctx, `SELECT * FROM `+table+` ORDER BY rowid`)
	if err != nil {
		return fmt.Errorf("store: %s: %w", table, err)
	}
	defer rows.Close()
	cols, err := rows.Columns()
	if err != nil {
		return err
	}
	for rows.Next() {
		vals := make([]any, len(cols))
		ptrs := make([]any, len(cols))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			return fmt.Errorf("store: %s: %w", table, err)
		}
		row := make(map[string]any, len(cols))
		for i, c := range cols {
			row[c] = vals[i]
		}
		if err := fn(row); err != nil {
			return err
		}
	}
	return rows.Err()
}
