//! The builtin agent: offline and deterministic, but it really works on the message. It
//! always reads the message with a tool, calls the calculator or the clock when the
//! message needs one, and streams its answer word by word at the configured pace (the
//! run merges the words into a few deltas).

use std::time::{Duration, Instant};

use serde_json::json;

use super::tools::{self, Tool};
use super::{Answer, RunContext, RunFailure};
use crate::protocol::{Payload, Status};

/// The builtin provider's settings.
#[derive(Debug, Clone)]
pub struct Builtin {
    /// Pause between streamed chunks; zero streams the answer as one chunk.
    pub token_delay: Duration,
}

impl Builtin {
    /// Answers the run's message with the tools it needs, streaming word by word.
    pub async fn run(&self, ctx: &RunContext) -> Result<Answer, RunFailure> {
        let text = ctx.text.as_str();
        let mut tools_used = vec![Tool::AnalyzeMessage];
        let expression = tools::find_expression(text);
        if expression.is_some() {
            tools_used.push(Tool::Calculator);
        }
        let lowered = text.to_lowercase();
        if lowered.split(|c: char| !c.is_alphanumeric()).any(|w| matches!(w, "time" | "date" | "today" | "clock")) {
            tools_used.push(Tool::Clock);
        }
        let total_steps = tools_used.len() as u64 + 1;
        ctx.emit(thinking("Reading your message", 1, total_steps)).await?;

        let mut sentences = Vec::new();
        for (i, tool) in tools_used.iter().enumerate() {
            let args = match tool {
                Tool::AnalyzeMessage => json!({"text": text}),
                Tool::Calculator => json!({"expression": expression.clone().unwrap_or_default()}),
                Tool::Clock => json!({}),
            };
            let running = format!("Running {}", tool.name());
            ctx.emit(Payload::ToolExecuting {
                tool_name: tool.name(),
                parameters: &args,
                status: Status::Executing,
                message: &running,
            })
            .await?;
            let started = Instant::now();
            let result = tool.run(&args);
            let elapsed_ms = started.elapsed().as_millis() as u64;
            let (result_json, message) = match &result {
                Ok(v) => (v.clone(), format!("{} finished", tool.name())),
                Err(e) => (json!({"error": e}), format!("{} failed: {e}", tool.name())),
            };
            ctx.emit(Payload::ToolCompleted {
                tool_name: tool.name(),
                result: &result_json,
                execution_time_ms: elapsed_ms,
                status: Status::Completed,
                message: &message,
            })
            .await?;
            if let Ok(v) = result {
                match tool {
                    Tool::Calculator => sentences.push(format!(
                        "{} = {}.",
                        v["expression"].as_str().unwrap_or(""),
                        v["value"].as_str().unwrap_or("")
                    )),
                    Tool::Clock => sentences.push(format!("It is {} (UTC).", v["utc"].as_str().unwrap_or(""))),
                    Tool::AnalyzeMessage => {}
                }
            }
            if i + 1 < tools_used.len() {
                let checked = format!("Checked with {}", tool.name());
                ctx.emit(thinking(&checked, i as u64 + 2, total_steps)).await?;
            }
        }

        if sentences.is_empty() {
            let words = text.split_whitespace().count();
            sentences.push(format!(
                "You wrote {words} word{}{}. I am netra's builtin agent and I work offline: I can do arithmetic \
                 (try \"what is 12 * (3 + 4)?\") and tell the time. Set LLM_BASE_URL to talk to a real model.",
                if words == 1 { "" } else { "s" },
                if text.trim_end().ends_with('?') { ", and asked a question" } else { "" },
            ));
        }
        // The run sees the thread's earlier conversation.
        let mut earlier = ctx.history.iter().rev().skip(1).filter(|m| m.role == "user");
        if let Some(previous) = earlier.next() {
            let count = 1 + earlier.count();
            let shown: String = previous.content.chars().take(80).collect();
            sentences.push(format!(
                "Earlier in this thread ({count} message{} from you) you wrote: \"{shown}\".",
                if count == 1 { "" } else { "s" }
            ));
        }
        let answer = sentences.join(" ");

        ctx.emit(thinking("Writing the answer", total_steps, total_steps)).await?;
        if self.token_delay.is_zero() {
            ctx.stream_text(&answer).await?;
        } else {
            let words: Vec<&str> = answer.split(' ').collect();
            for (i, word) in words.iter().enumerate() {
                let chunk = if i + 1 < words.len() { format!("{word} ") } else { (*word).to_string() };
                if i > 0 {
                    tokio::time::sleep(self.token_delay).await;
                }
                ctx.stream_text(&chunk).await?;
            }
        }
        Ok(Answer { text: answer, tools: tools_used.iter().map(|t| t.name().to_string()).collect(), usage: None })
    }
}

/// Step `step` of `total`, with the share of the run done before it.
fn thinking(reasoning: &str, step: u64, total: u64) -> Payload<'_> {
    Payload::AgentThinking {
        reasoning,
        step_number: step,
        total_steps: Some(total),
        progress_percentage: Some(100 * step / (total + 1)),
        status: Status::Thinking,
    }
}
