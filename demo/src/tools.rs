//! The demo's real tools: a calculator and an append-only expense ledger.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use normandy_core::{Tool, ToolContext, ToolOutput, ToolSpec, async_trait};
use serde_json::json;

/// Counts tool executions in this process, so the demo can show that a resumed turn does not
/// repeat the calls that had finished before the kill.
#[derive(Clone, Default)]
pub(crate) struct Counter(Arc<AtomicUsize>);

impl Counter {
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// What a tool does after it ran: lets the demo SIGKILL itself mid-turn on request.
pub(crate) type AfterCall = Arc<dyn Fn(usize) + Send + Sync>;

/// Evaluates arithmetic: `+ - * /`, parentheses, decimals.
pub(crate) struct Calculator {
    pub(crate) delay: Duration,
    pub(crate) runs: Counter,
    pub(crate) after: AfterCall,
}

#[async_trait]
impl Tool for Calculator {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "calculator".into(),
            description: "Evaluates an arithmetic expression with + - * / and parentheses.".into(),
            input_schema: json!({
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"]
            }),
        }
    }

    async fn call(&self, input: serde_json::Value, _ctx: ToolContext) -> ToolOutput {
        tokio::time::sleep(self.delay).await;
        let n = self.runs.bump();
        let out = match input.get("expression").and_then(|e| e.as_str()) {
            None => ToolOutput::error("missing \"expression\""),
            Some(expr) => match eval(expr) {
                Ok(v) => ToolOutput::ok(format_amount(v)),
                Err(e) => ToolOutput::error(format!("cannot evaluate {expr:?}: {e}")),
            },
        };
        (self.after)(n);
        out
    }
}

/// Appends an expense to a ledger file: a side effect that must not happen twice, so it is
/// declared non-idempotent (the engine records its start before it runs).
pub(crate) struct Ledger {
    pub(crate) path: PathBuf,
    pub(crate) delay: Duration,
    pub(crate) runs: Counter,
    pub(crate) after: AfterCall,
}

#[async_trait]
impl Tool for Ledger {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "record_expense".into(),
            description: "Appends an expense to the ledger; returns its line number.".into(),
            input_schema: json!({
                "type": "object",
                "properties": {"label": {"type": "string"}, "amount": {"type": "string"}},
                "required": ["label", "amount"]
            }),
        }
    }

    fn idempotent(&self) -> bool {
        false
    }

    async fn call(&self, input: serde_json::Value, ctx: ToolContext) -> ToolOutput {
        tokio::time::sleep(self.delay).await;
        let n = self.runs.bump();
        let label = input.get("label").and_then(|v| v.as_str()).unwrap_or("?");
        let amount = input.get("amount").and_then(|v| v.as_str()).unwrap_or("?");
        let result = (|| -> std::io::Result<usize> {
            let existing = std::fs::read_to_string(&self.path).unwrap_or_default();
            let line = existing.lines().count() + 1;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            writeln!(f, "{line}\t{label}\t{amount}\t(call {})", ctx.call_id)?;
            Ok(line)
        })();
        let out = match result {
            // The result says what comes next, not only what happened: after a bare "ledger line
            // 1", Qwen2.5-Coder 1.5B (greedy, on llama.cpp) called record_expense again and
            // again until the step limit, in a plain run as after a resume; told that the
            // expense is saved and the answer is due, it answers.
            Ok(line) => ToolOutput::ok(format!(
                "Recorded as ledger line {line}. The expense is saved: now answer the user in \
                 one short line with the total, without calling a tool."
            )),
            Err(e) => ToolOutput::error(format!("ledger write failed: {e}")),
        };
        (self.after)(n);
        out
    }
}

pub(crate) fn format_amount(v: f64) -> String {
    format!("{v:.2}")
}

/// A small recursive-descent evaluator.
pub(crate) fn eval(expr: &str) -> Result<f64, String> {
    let tokens: Vec<char> = expr.chars().filter(|c| !c.is_whitespace()).collect();
    let mut pos = 0;
    let v = sum(&tokens, &mut pos)?;
    if pos != tokens.len() {
        return Err(format!("unexpected {:?} at {pos}", tokens[pos]));
    }
    Ok(v)
}

fn sum(t: &[char], pos: &mut usize) -> Result<f64, String> {
    let mut v = product(t, pos)?;
    while let Some(&op) = t.get(*pos) {
        if op != '+' && op != '-' {
            break;
        }
        *pos += 1;
        let rhs = product(t, pos)?;
        v = if op == '+' { v + rhs } else { v - rhs };
    }
    Ok(v)
}

fn product(t: &[char], pos: &mut usize) -> Result<f64, String> {
    let mut v = atom(t, pos)?;
    while let Some(&op) = t.get(*pos) {
        if op != '*' && op != '/' {
            break;
        }
        *pos += 1;
        let rhs = atom(t, pos)?;
        if op == '/' && rhs == 0.0 {
            return Err("division by zero".into());
        }
        v = if op == '*' { v * rhs } else { v / rhs };
    }
    Ok(v)
}

fn atom(t: &[char], pos: &mut usize) -> Result<f64, String> {
    match t.get(*pos) {
        Some('(') => {
            *pos += 1;
            let v = sum(t, pos)?;
            if t.get(*pos) != Some(&')') {
                return Err("missing ')'".into());
            }
            *pos += 1;
            Ok(v)
        }
        Some('-') => {
            *pos += 1;
            Ok(-atom(t, pos)?)
        }
        Some(c) if c.is_ascii_digit() || *c == '.' => {
            let start = *pos;
            while t.get(*pos).is_some_and(|c| c.is_ascii_digit() || *c == '.') {
                *pos += 1;
            }
            let s: String = t[start..*pos].iter().collect();
            s.parse().map_err(|_| format!("bad number {s:?}"))
        }
        Some(c) => Err(format!("unexpected {c:?}")),
        None => Err("unexpected end".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::eval;

    #[test]
    fn evaluates() {
        assert_eq!(eval("3*89.90").unwrap(), 3.0 * 89.90);
        assert_eq!(eval("(1+2)*-3").unwrap(), -9.0);
        assert!(eval("1/0").is_err());
        assert!(eval("2+").is_err());
        assert!(eval("2)").is_err());
    }
}
