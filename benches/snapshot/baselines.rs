//! The plain tools ours is compared with, for one source database: (a) the pipeline
//! (`psql -c "COPY (SELECT … WHERE <tenant>) TO STDOUT" | zstd -3 | age -r …` per table,
//! appended to one file) and, for reference, the same in one psql session and one zstd/age
//! stream; (b) `pg_dump`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use updog_backup_test_support::fixture::tenant_tables;
use updog_backup_test_support::postgres;

use crate::measure::{Sample, measure};
use crate::ours::Env;

/// The baselines' commands and output files; each measurement deletes its output.
pub(crate) struct Baselines<'a> {
    pg: &'a postgres::Cluster,
    env: &'a Env,
    db: String,
    pipeline: String,
    pipeline_out: PathBuf,
    one_stream: String,
    one_stream_out: PathBuf,
    pg_dump_out: PathBuf,
}

impl<'a> Baselines<'a> {
    /// The scripts for `largest`, connecting with `conn` (psql's options) as the backup role.
    pub(crate) fn new(
        pg: &'a postgres::Cluster,
        env: &'a Env,
        db: &str,
        conn: &str,
        largest: &str,
    ) -> Self {
        let psql = pg.bin.join("psql");
        let copies: Vec<String> = tenant_tables()
            .map(|(table, filter)| {
                format!(
                    "COPY (SELECT * FROM {table} WHERE {}) TO STDOUT",
                    filter.replace("$ORG", largest)
                )
            })
            .collect();
        // The pipeline, once per table, appended to one file.
        let pipeline_out = env.dir.join("pipeline.out");
        let mut pipeline = format!(": > {}\n", pipeline_out.display());
        for copy in &copies {
            writeln!(
                pipeline,
                "{} -X -q {conn} -c \"{copy}\" | zstd -3 -q | age -r {} >> {}",
                psql.display(),
                env.recipient,
                pipeline_out.display()
            )
            .unwrap();
        }
        // For reference: one session, one zstd frame, one age stream (fewer processes).
        let one_stream_out = env.dir.join("one_stream.out");
        let one_stream = format!(
            "{} -X -q {conn} {} | zstd -3 -q | age -r {} > {}",
            psql.display(),
            copies
                .iter()
                .map(|c| format!("-c \"{c}\""))
                .collect::<Vec<_>>()
                .join(" "),
            env.recipient,
            one_stream_out.display()
        );
        Baselines {
            pg,
            env,
            db: db.to_string(),
            pipeline,
            pipeline_out,
            one_stream,
            one_stream_out,
            pg_dump_out: env.dir.join("pg_dump.out"),
        }
    }

    /// The pipeline, one per table.
    pub(crate) fn pipeline(&self) -> Sample {
        self.sh(&self.pipeline, &self.pipeline_out)
    }

    /// One psql session, one zstd frame, one age stream.
    pub(crate) fn one_stream(&self) -> Sample {
        self.sh(&self.one_stream, &self.one_stream_out)
    }

    fn sh(&self, script: &str, out: &Path) -> Sample {
        let o = measure(
            self.pg,
            &self.env.dir,
            Path::new("sh"),
            &["-c".into(), script.into()],
            &[],
        );
        assert!(
            o.stderr.trim().is_empty(),
            "baseline wrote errors: {}",
            o.stderr
        );
        let bytes = fs::metadata(out).map(|m| m.len()).unwrap_or(0);
        let _ = fs::remove_file(out);
        Sample {
            bytes,
            ..Sample::from(&o)
        }
    }

    /// `pg_dump -n app -n audit <extra>` as the backup role, to a file.
    pub(crate) fn pg_dump(&self, extra: &[&str]) -> Sample {
        let (pg, port) = (self.pg, self.pg.port.to_string());
        let mut a: Vec<String> = [
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "updog_backup",
            "-d",
            &self.db,
            "-n",
            "app",
            "-n",
            "audit",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        a.push("-f".into());
        a.push(self.pg_dump_out.display().to_string());
        let o = measure(pg, &self.env.dir, &pg.bin.join("pg_dump"), &a, &[]);
        let bytes = fs::metadata(&self.pg_dump_out)
            .map(|m| m.len())
            .unwrap_or(0);
        let _ = fs::remove_file(&self.pg_dump_out);
        Sample {
            bytes,
            ..Sample::from(&o)
        }
    }
}
