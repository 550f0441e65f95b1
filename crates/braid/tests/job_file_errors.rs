//! Proves that every kind of job-file mistake stops `braid validate` and `braid run`
//! with exit code 2 and a message naming the file, the field and the reason, and that a
//! good job file validates and prints its resolved plan.

mod common;

use common::{braid, stderr};

const GOOD: &str = r#"name = "t"

[[source]]
name = "impressions"
kind = "files"
path = "data/*.ndjson"
key = ["profile_id", "title_id"]
time = "ts"
id = "event_id"

[[source]]
name = "plays"
kind = "files"
path = "data/*.ndjson"
key = ["profile_id", "title_id"]
time = "ts"

[join]
left = "impressions"
right = "plays"
type = "left"
within = ["0s", "1h"]

[time]
max_out_of_orderness = "5s"

[output]
kind = "files"
path = "out"

[state]
memory_max = "64MiB"

[checkpoint]
interval = "10s"
"#;

fn with_job(text: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("data")).expect("mkdir");
    std::fs::write(dir.path().join("data/a.ndjson"), "{}\n").expect("write");
    let job = dir.path().join("job.toml");
    std::fs::write(&job, text).expect("write");
    let mut all: Vec<&str> = args.to_vec();
    let job_str = job.to_str().expect("utf-8").to_string();
    all.push(&job_str);
    let out = braid(&all);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr(&out),
    )
}

#[test]
fn a_good_job_validates_and_prints_its_plan() {
    let (code, stdout, err) = with_job(GOOD, &["validate"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(stdout.contains("join: Left"), "{stdout}");
    assert!(stdout.contains("1 file(s)"), "{stdout}");
    assert!(
        stdout.contains("once 32 later events agree with it")
            && stdout.contains("more than 3600000 ms ahead are held"),
        "the time guard's defaults: {stdout}"
    );
    let off = GOOD.replace(
        "max_out_of_orderness = \"5s\"",
        "max_out_of_orderness = \"5s\"\ncorroborate = 0",
    );
    let (code, stdout, err) = with_job(&off, &["validate"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(stdout.contains("not guarded (corroborate = 0)"), "{stdout}");
}

#[test]
fn each_mistake_names_its_field_and_exits_2() {
    let cases: &[(&str, &str, &str)] = &[
        ("name = \"t\"", "name = \"t\"\ncolour = \"red\"", "unknown field `colour`"),
        ("type = \"left\"", "type = \"left\"\nmode = \"x\"", "unknown field `mode`"),
        ("type = \"left\"", "type = \"outer\"", "[join] type: `outer` is not a join type"),
        ("max_out_of_orderness = \"5s\"", "max_out_of_orderness = \"5 seconds\"", "[time] max_out_of_orderness: `5 seconds` is not a duration"),
        ("within = [\"0s\", \"1h\"]", "within = [\"0s\", \"1hour\"]", "[join] within: `1hour` is not a duration"),
        ("within = [\"0s\", \"1h\"]", "within = [\"1h\", \"0s\"]", "[join] within: lower bound 1h is after upper bound 0s"),
        ("within = [\"0s\", \"1h\"]", "within = [\"0s\"]", "[join] within: needs two durations"),
        ("memory_max = \"64MiB\"", "memory_max = \"64MB\"", "[state] memory_max: `64MB` is not a size"),
        ("memory_max = \"64MiB\"", "memory_max = \"1KiB\"", "[state] memory_max: 1024 bytes is below the minimum"),
        ("memory_max = \"64MiB\"", "memory_max = \"64MiB\"\ncold_probes = \"lazy\"", "[state] cold_probes: `lazy` is neither \"deferred\" nor \"eager\""),
        ("memory_max = \"64MiB\"", "memory_max = \"64MiB\"\npayloads = \"zipped\"", "[state] payloads: `zipped` is not \"auto\", \"shaped\" or \"verbatim\""),
        ("right = \"plays\"", "right = \"clicks\"", "[join] right: no source is named `clicks`"),
        ("left = \"impressions\"", "left = \"views\"", "[join] left: no source is named `views`"),
        ("key = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\nid", "key = []\ntime = \"ts\"\nid", "[[source]] impressions: key: the key needs at least one field"),
        ("path = \"data/*.ndjson\"\nkey = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\n\n", "path = \"nothing/*.ndjson\"\nkey = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\n\n", "no file matches"),
        ("kind = \"files\"\npath = \"data/*.ndjson\"\nkey = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\nid", "kind = \"ftp\"\npath = \"data/*.ndjson\"\nkey = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\nid", "[[source]] impressions: kind: `ftp` is not a source kind"),
        ("name = \"plays\"", "name = \"impressions\"", "name `impressions` is used twice"),
        ("interval = \"10s\"", "interval = \"0s\"", "[checkpoint] interval: must be positive"),
        ("kind = \"files\"\npath = \"out\"", "kind = \"carrier-pigeon\"\npath = \"out\"", "[output] kind: `carrier-pigeon` is not an output kind"),
        ("type = \"left\"", "type = 3", "invalid type"),
        ("max_out_of_orderness = \"5s\"", "max_out_of_orderness = \"5s\"\nmax_time_jump = \"soon\"", "[time] max_time_jump: `soon` is not a duration"),
        ("max_out_of_orderness = \"5s\"", "max_out_of_orderness = \"5s\"\nmax_time_jump = \"0s\"", "[time] max_time_jump: must be positive, or \"off\""),
        ("max_out_of_orderness = \"5s\"", "max_out_of_orderness = \"5s\"\ncorroborate = -1", "invalid value"),
        // Kafka: fields of another kind, what a kafka source needs, exactly-once's rules.
        ("path = \"data/*.ndjson\"\nkey = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\nid", "path = \"data/*.ndjson\"\ntopic = \"t\"\nkey = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\nid", "[[source]] impressions: topic: only a `kafka` source takes it"),
        ("kind = \"files\"\npath = \"data/*.ndjson\"\nkey = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\nid", "kind = \"kafka\"\nbrokers = \"127.0.0.1:1\"\nkey = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\nid", "[[source]] impressions: topic: a kafka source needs a topic"),
        ("kind = \"files\"\npath = \"data/*.ndjson\"\nkey = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\nid", "kind = \"kafka\"\ntopic = \"i\"\nbrokers = \"127.0.0.1:1\"\nstart = \"yesterday\"\nkey = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\nid", "[[source]] impressions: start: `yesterday` is not earliest, latest or an RFC 3339 time"),
        ("key = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\nid", "key = [\"profile_id\", \"title_id\"]\nid", "[[source]] impressions: time: a files source needs the field that holds the event time"),
        ("kind = \"files\"\npath = \"out\"", "kind = \"kafka\"\nbrokers = \"127.0.0.1:1\"\ntopic = \"o\"", "[output] kind: a kafka output commits its transactions together with the sources' Kafka offsets, and source `impressions` is not kafka"),
        ("kind = \"files\"\npath = \"out\"", "kind = \"kafka\"\npath = \"out\"\nbrokers = \"127.0.0.1:1\"\ntopic = \"o\"", "[output] path: only a `files` output takes it"),
        ("kind = \"files\"\npath = \"out\"", "kind = \"kafka\"\nbrokers = \"127.0.0.1:1\"\ntopic = \"o\"\n[output.properties]\n\"transaction.timeout.ms\" = \"20000\"", "[output.properties] transaction.timeout.ms: 20000 ms is too short for [checkpoint] interval 10s"),
        ("interval = \"10s\"", "interval = \"10m\"\n[output.properties]", "[output] properties: only a `kafka` output takes it"),
        // A live generator, and [metrics].
        ("path = \"data/*.ndjson\"\nkey = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\nid", "path = \"data/*.ndjson\"\nrate = 10\nkey = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\nid", "[[source]] impressions: rate: only a `generator` source takes it"),
        ("kind = \"files\"\npath = \"data/*.ndjson\"\nkey = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\nid", "kind = \"generator\"\nstream = \"impressions\"\nrate = 10\nkey = [\"profile_id\", \"title_id\"]\ntime = \"ts\"\nid", "[[source]] impressions: start: a live generator (`rate`) in a job with [checkpoint] needs a `start` time"),
        ("interval = \"10s\"", "interval = \"10s\"\n[metrics]\nlisten = \"nowhere\"", "[metrics] listen: `nowhere` is not an address to listen on"),
        ("interval = \"10s\"", "interval = \"10s\"\n[metrics]\nlinger = \"a while\"", "[metrics] linger: `a while` is not a duration"),
    ];
    for (from, to, want) in cases {
        assert!(
            GOOD.contains(from),
            "case {want}: `{from}` not in the good job"
        );
        let bad = GOOD.replacen(from, to, 1);
        for command in ["validate", "run"] {
            let (code, _, err) = with_job(&bad, &[command]);
            assert_eq!(code, Some(2), "{command} with {want}: {err}");
            assert!(err.contains(want), "{command}: `{want}` not in: {err}");
            assert!(
                err.contains("job.toml"),
                "{command}: the file is not named in: {err}"
            );
        }
    }
}

#[test]
fn a_missing_job_file_exits_2_and_bad_usage_exits_2() {
    let out = braid(&["validate", "/nonexistent/job.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot read the job file"));
    let out = braid(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}
