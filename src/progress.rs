//! Progress of long work: a bar on a terminal, a structured log line every few seconds
//! otherwise (logs are JSON there, and a bar would only garble them).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const LOG_EVERY: Duration = Duration::from_secs(5);

/// What the amounts passed to [`Progress::advance`] are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    StoredBytes,
    Rows,
    DeletedBytes,
    /// Keys re-wrapped to new recipients (the others had them already).
    Rewrapped,
}

/// Counts finished items (archives, objects, tables) and the bytes or rows they carried.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    work: &'static str,
    items: &'static str,
    unit: Unit,
    total: u64,
    /// Items done, amount done, last log line.
    state: Mutex<(u64, u64, Instant)>,
}

impl Progress {
    /// `work` names the job in logs ("snapshot"), `items` what is counted ("archives").
    pub fn new(work: &'static str, items: &'static str, unit: Unit, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            let template =
                format!("{{spinner}} {items} {{pos}}/{{len}} [{{bar:30}}] {{msg}} {{elapsed}}");
            bar.set_style(
                indicatif::ProgressStyle::with_template(&template)
                    .expect("the template is valid")
                    .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            work,
            items,
            unit,
            total,
            state: Mutex::new((0, 0, Instant::now())),
        }
    }

    /// One more item done, carrying `amount` of the unit.
    pub fn advance(&self, amount: u64) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.0 += 1;
        state.1 += amount;
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                bar.set_message(self.describe(state.1));
            }
            None if state.2.elapsed() >= LOG_EVERY || state.0 == self.total => {
                state.2 = Instant::now();
                tracing::info!(
                    work = self.work,
                    done = state.0,
                    of = self.total,
                    items = self.items,
                    amount = state.1,
                    "progress"
                );
            }
            None => {}
        }
    }

    /// Work before the first item is done (a snapshot reading its tables): shown on the
    /// bar, logged every few seconds otherwise.
    pub fn status(&self, message: String) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &self.bar {
            Some(bar) => bar.set_message(message),
            None if state.2.elapsed() >= LOG_EVERY => {
                state.2 = Instant::now();
                tracing::info!(work = self.work, status = %message, "progress");
            }
            None => {}
        }
    }

    fn describe(&self, amount: u64) -> String {
        match self.unit {
            Unit::StoredBytes => format!("{:.1} MiB stored", amount as f64 / f64::from(1 << 20)),
            Unit::Rows => format!("{amount} rows"),
            Unit::Rewrapped => format!("{amount} re-wrapped"),
            Unit::DeletedBytes => {
                format!("{:.1} MiB deleted", amount as f64 / f64::from(1 << 20))
            }
        }
    }

    /// Prints a line to stdout without tearing the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
