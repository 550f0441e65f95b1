//! braid's set-up path, the README's two commands:
//!
//! - `cargo xtask demo [ARGS]`: installs the system packages the build needs, builds
//!   braid and runs `braid demo ARGS`;
//! - `cargo xtask test [ARGS]`: the same, plus the services the tests start (moto, an
//!   S3-compatible server; noida-db, a Kafka-protocol broker) and the browser the
//!   status page's test drives (Debian's chromium), then
//!   `cargo test --release ARGS`;
//! - `cargo xtask setup`: the installing alone, after which plain `cargo build --release`
//!   and `cargo test --release` work.
//!
//! On a fresh Debian machine with only Rust, python3 and git nothing else is needed.
//! Packages are installed with apt-get as root, or through `sudo -n` when that works
//! without a password; otherwise the task stops before anything compiles and prints the
//! exact install line. This crate has no dependencies, so it builds in seconds and checks
//! the machine before cargo starts on RocksDB's C++.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// What the first build costs, measured on a 2-core machine (README "Quick start").
const FIRST_BUILD_NOTE: &str = "the first build compiles RocksDB's C++ once: about 12 minutes \
     on 2 cores; later builds take seconds";

/// How long apt-get waits for the dpkg lock of another apt-get.
const APT_LOCK_TIMEOUT: &str = "DPkg::Lock::Timeout=600";

/// moto, the S3-compatible server the checkpoint tests start, from PyPI.
const MOTO_VERSION: &str = "5.2.5";
/// Where the tests look for it (`crates/braid/tests/s3_checkpoints.rs`).
const MOTO_VENV: &str = "target/moto-venv";
/// noida-db, the Kafka-protocol broker (with real transactions) the Kafka tests start,
/// from PyPI: its wheel holds a prebuilt binary.
const NOIDA_VERSION: &str = "0.2.3";
const NOIDA_VENV: &str = "target/noida-venv";

/// A Debian package the build or the tests need, and how to tell it is there.
struct Package {
    name: &'static str,
    why: &'static str,
    probe: Probe,
}

enum Probe {
    /// dpkg says the package is installed.
    Dpkg,
    /// This command succeeds: for what may come from outside Debian's packages, such as
    /// a python3 built by pyenv, which makes venvs without `python3-venv`.
    Command(&'static [&'static str]),
}

const BUILD_PACKAGES: &[Package] = &[
    Package {
        name: "clang",
        why: "bindgen generates RocksDB's Rust bindings with it",
        probe: Probe::Dpkg,
    },
    Package {
        name: "libclang-dev",
        why: "bindgen loads libclang",
        probe: Probe::Dpkg,
    },
    Package {
        name: "g++",
        why: "RocksDB is C++",
        probe: Probe::Command(&["c++", "--version"]),
    },
    Package {
        name: "cmake",
        why: "rdkafka builds librdkafka with it",
        probe: Probe::Command(&["cmake", "--version"]),
    },
    Package {
        name: "libcurl4-openssl-dev",
        why: "librdkafka 2.12 includes curl's headers even when it does not use curl",
        probe: Probe::Dpkg,
    },
];

const TEST_PACKAGES: &[Package] = &[
    Package {
        name: "python3-venv",
        why: "moto (the S3 server) and noida-db (the Kafka broker) of the tests install into Python venvs",
        probe: Probe::Command(&["python3", "-c", "import ensurepip, venv"]),
    },
    Package {
        name: "chromium",
        why: "the status page's test loads it in headless Chromium (crates/braid/tests/live_metrics.rs)",
        probe: Probe::Dpkg,
    },
];

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let result = match task.as_str() {
        "demo" => install(&[BUILD_PACKAGES], false).and_then(|()| {
            cargo(&[&["run", "--release", "--", "demo"][..], &strs(&rest)].concat())
        }),
        "test" => install(&[BUILD_PACKAGES, TEST_PACKAGES], true)
            .and_then(|()| cargo(&[&["test", "--release"][..], &strs(&rest)].concat())),
        "setup" => install(&[BUILD_PACKAGES, TEST_PACKAGES], true).map(|()| 0),
        _ => {
            eprintln!(
                "usage: cargo xtask demo [ARGS] | test [ARGS] | setup\n\
                 \n  demo   install what the build needs, build braid, run `braid demo ARGS`\
                 \n  test   the same plus the tests' services, then `cargo test --release ARGS`\
                 \n  setup  only install (then plain `cargo build/test --release` work)"
            );
            Ok(2)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::from(1)
        }
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace's folder")
        .to_path_buf()
}

/// Installs the missing packages and, for the tests, moto and noida-db.
fn install(packages: &[&[Package]], services: bool) -> Result<(), String> {
    let missing: Vec<&Package> = packages
        .iter()
        .copied()
        .flatten()
        .filter(|p| !p.present())
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    if services {
        install_moto()?;
        install_noida()?;
    }
    Ok(())
}

impl Package {
    fn present(&self) -> bool {
        match self.probe {
            Probe::Dpkg => match output("dpkg-query", &["-W", "-f=${Status}", self.name]) {
                Some(status) => status.trim() == "install ok installed",
                // No dpkg: not Debian. The build says what it lacks, if anything.
                None => !has_command("dpkg-query"),
            },
            Probe::Command(command) => succeeds(command[0], &command[1..]),
        }
    }
}

fn apt_install(missing: &[&Package]) -> Result<(), String> {
    let packages: Vec<&str> = missing.iter().map(|p| p.name).collect();
    let names = packages.join(" ");
    for package in missing {
        eprintln!("xtask: missing {}: {}", package.name, package.why);
    }
    if !has_command("apt-get") {
        return Err(format!(
            "no apt-get here: install the equivalents of these Debian packages with your \
             system's package manager, then run this command again: {names}"
        ));
    }
    let Some(prefix) = privilege() else {
        return Err(format!(
            "installing packages needs root, and sudo is not available without a password. \
             Install them, then run this command again:\n\n    \
             sudo apt-get update && sudo apt-get install -y {names}\n"
        ));
    };
    eprintln!("xtask: installing {names} with apt-get (about half a minute)");
    let apt = |args: &[&str]| {
        let mut argv: Vec<&str> = prefix.clone();
        // Wait for a dpkg lock another apt holds (unattended upgrades on a machine
        // just booted) instead of failing at once.
        argv.extend([
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "-o",
            APT_LOCK_TIMEOUT,
        ]);
        argv.extend(args);
        run_quietly(Command::new(argv[0]).args(&argv[1..]))
    };
    apt(&["update", "-qq"])?;
    apt(&[&["install", "-y", "-qq"][..], &packages].concat())?;
    match missing.iter().find(|p| !p.present()) {
        Some(package) => Err(format!(
            "{} is still missing after apt-get install",
            package.name
        )),
        None => Ok(()),
    }
}

/// The command prefix that runs apt-get with root's rights: none as root, `sudo -n`
/// when it works without a password, else `None`.
fn privilege() -> Option<Vec<&'static str>> {
    if output("id", &["-u"]).is_some_and(|uid| uid.trim() == "0") {
        Some(Vec::new())
    } else if succeeds("sudo", &["-n", "true"]) {
        Some(vec!["sudo", "-n"])
    } else {
        None
    }
}

fn install_moto() -> Result<(), String> {
    let venv = workspace().join(MOTO_VENV);
    if venv.join("bin/moto_server").is_file() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing moto[server]=={MOTO_VERSION} into {} (the S3 server of the \
         checkpoint tests; about half a minute, once)",
        venv.display()
    );
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    // moto_server is among the last files pip writes: a broken install leaves it absent
    // and the next run installs again into the same venv.
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        &format!("moto[server]=={MOTO_VERSION}"),
    ]))
}

fn install_noida() -> Result<(), String> {
    let venv = workspace().join(NOIDA_VENV);
    if venv.join("bin/noida-db").is_file() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing noida-db=={NOIDA_VERSION} into {} (the Kafka broker of the tests; \
         a few seconds, once)",
        venv.display()
    );
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        &format!("noida-db=={NOIDA_VERSION}"),
    ]))
}

/// Runs cargo (the one that runs this task) with `args` in the workspace.
fn cargo(args: &[&str]) -> Result<u8, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from);
    if !target.join("release/braid").exists() {
        eprintln!("xtask: {FIRST_BUILD_NOTE}");
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(args)
        .current_dir(workspace())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    Ok(status
        .code()
        .map_or(1, |code| u8::try_from(code).unwrap_or(1)))
}

fn run(command: &mut Command) -> Result<(), String> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

/// Runs a command whose output matters only when it fails (apt-get's progress).
fn run_quietly(command: &mut Command) -> Result<(), String> {
    let shown = format!("{command:?}");
    let out = command
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    output(program, args).is_some()
}

fn has_command(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
