//! [`Soft`]: assertions that record a mismatch and let the test go on, so
//! that one wrong secondary field (a total) does not hide whether the
//! following steps work. The test fails at [`Soft::finish`] with all of them.

use std::{fmt::Debug, sync::Mutex};

#[derive(Default)]
pub struct Soft {
    failures: Mutex<Vec<String>>,
}

impl Soft {
    pub fn new() -> Soft {
        Soft::default()
    }

    /// Records a failure unless `actual == expected`.
    pub fn eq<T: PartialEq + Debug>(&self, what: &str, actual: T, expected: T) {
        if actual != expected {
            self.fail(format!("{what}: got {actual:?}, expected {expected:?}"));
        }
    }

    /// Records every violation of [`crate::status::invariants`] in `status`.
    pub fn invariants(&self, context: &str, status: &serde_json::Value) {
        for violation in crate::status::invariants(status) {
            self.fail(format!("{context}: {violation}"));
        }
    }

    pub fn fail(&self, message: String) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(message);
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.failures.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Fails the test if any check failed.
    #[track_caller]
    pub fn finish(self) {
        let failures = self.take();
        assert!(
            failures.is_empty(),
            "{} check(s) failed:\n  - {}",
            failures.len(),
            failures.join("\n  - ")
        );
    }
}

impl Drop for Soft {
    fn drop(&mut self) {
        let failures = self.take();
        if failures.is_empty() {
            return;
        }
        let report = format!(
            "{} check(s) failed before this point:\n  - {}",
            failures.len(),
            failures.join("\n  - ")
        );
        if std::thread::panicking() {
            eprintln!("{report}");
        } else {
            panic!("{report} (Soft dropped without finish())");
        }
    }
}
