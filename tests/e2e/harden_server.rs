//! Issue 12 regression tests: see the module's tests.
