//! The terminal front-ends: `--prompt` (one answer on stdout, for scripts) and `--console`
//! (an interactive chat with history). Both stream the reply as it is generated.

use std::io::{IsTerminal, Write};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::chat::{ChatMessage, ChatRequest, GenerateParams, StreamEvent};
use crate::engine::{EngineHandle, ReplyStream};

/// Settings shared by both front-ends.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Generation parameters of every reply.
    pub generate: GenerateParams,
    /// System prompt put before the conversation.
    pub system_prompt: Option<String>,
    /// Print the prompt's tokens to stderr before each reply.
    pub verbose_prompt: bool,
}

impl ConsoleConfig {
    fn request(&self, history: &[ChatMessage]) -> ChatRequest {
        let messages = self
            .system_prompt
            .iter()
            .map(ChatMessage::system)
            .chain(history.iter().cloned())
            .collect();
        ChatRequest::new(messages, self.generate.clone())
    }

    async fn submit(
        &self,
        engine: &EngineHandle,
        history: &[ChatMessage],
    ) -> anyhow::Result<ReplyStream> {
        let request = self.request(history);
        engine
            .submit_async(request, self.verbose_prompt)
            .await
            .context("the engine refused the request")
    }
}

/// Streams one reply to `out`; returns its full text.
async fn stream_reply(mut stream: ReplyStream, out: &mut impl Write) -> anyhow::Result<String> {
    let mut text = String::new();
    while let Some(event) = stream.next_event().await {
        match event.context("generation failed")? {
            StreamEvent::Prompt(tokens) => {
                let mut err = std::io::stderr().lock();
                writeln!(err, "prompt: {} tokens", tokens.len())?;
                for token in tokens {
                    writeln!(err, "{:>6} -> {:?}", token.id, token.piece)?;
                }
            }
            StreamEvent::Delta(delta) => {
                out.write_all(delta.as_bytes())?;
                out.flush()?;
                text.push_str(&delta);
            }
            StreamEvent::Done(_) => return Ok(text),
        }
    }
    anyhow::bail!("the engine stopped before the reply was complete")
}

/// `--prompt`: answers `prompt` on stdout.
pub async fn answer_once(
    engine: &EngineHandle,
    config: &ConsoleConfig,
    prompt: &str,
) -> anyhow::Result<()> {
    let history = [ChatMessage::user(prompt)];
    let stream = config.submit(engine, &history).await?;
    let mut stdout = std::io::stdout().lock();
    stream_reply(stream, &mut stdout).await?;
    writeln!(stdout)?;
    Ok(())
}

/// `--console`: a chat on stdin/stdout until `/exit` or end of input.
pub async fn chat(engine: &EngineHandle, config: &ConsoleConfig) -> anyhow::Result<()> {
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "Chatting with {} — /reset forgets the conversation, /exit quits.",
            engine.info().name
        );
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut history: Vec<ChatMessage> = Vec::new();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next_line().await.context("reading stdin")? else {
            return Ok(());
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" | "/new" => {
                history.clear();
                println!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::user(line));
        let stream = config.submit(engine, &history).await?;
        let reply = stream_reply(stream, &mut std::io::stdout()).await?;
        println!();
        history.push(ChatMessage::assistant(reply.trim()));
    }
}
