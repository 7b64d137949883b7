//! The terminal front-ends: `--prompt` (one answer on stdout, for scripts) and `--console`
//! (an interactive chat with history). Both ask the [`Responder`] (over a chain holding the
//! local engine only, with a history kept in memory) and stream the reply as it comes.

use std::io::{IsTerminal, Write};

use anyhow::Context as _;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::chat::{ChatMessage, StreamEvent};
use crate::conversation::ConversationKey;
use crate::i18n::Lang;
use crate::providers::Reply;
use crate::responder::Responder;

/// The console's one conversation.
const CONSOLE: ConversationKey = ConversationKey {
    chat: 0,
    topic: None,
};

/// Streams one reply to `out`; returns its full text. With `--verbose-prompt`, the prompt's
/// tokens go to stderr first.
async fn stream_reply(reply: Reply, out: &mut impl Write) -> anyhow::Result<String> {
    let mut events = reply.events;
    let mut text = String::new();
    while let Some(event) = events.next().await {
        match event {
            StreamEvent::Started
            | StreamEvent::Logprobs(_)
            | StreamEvent::Choice(_)
            | StreamEvent::ChoiceEnd(_)
            | StreamEvent::ToolCall(_) => {}
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
    anyhow::bail!("the reply ended before it was complete")
}

/// `--prompt`: answers `prompt` on stdout. Fails (for scripts) when the local engine could
/// not answer and the canned apology would have been the answer.
pub async fn answer_once(responder: &Responder, prompt: &str) -> anyhow::Result<()> {
    let reply = responder
        .reply(
            vec![ChatMessage::user(prompt)],
            responder.generate().clone(),
            Lang::En,
        )
        .await
        .map_err(|refused| anyhow::anyhow!("the request was refused: {refused}"))?;
    if reply.provider == "canned" {
        anyhow::bail!("the local engine could not answer (see the warning above)");
    }
    let mut stdout = std::io::stdout().lock();
    stream_reply(reply, &mut stdout).await?;
    writeln!(stdout)?;
    Ok(())
}

/// `--console`: a chat on stdin/stdout until `/exit` or end of input.
pub async fn chat(responder: &Responder, model: &str) -> anyhow::Result<()> {
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("Chatting with {model} — /reset forgets the conversation, /exit quits.");
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
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
                responder.reset(CONSOLE).await?;
                println!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        let asked = responder
            .ask(CONSOLE, line.to_string(), None, Lang::En)
            .await?;
        let reply = match asked.reply {
            Ok(reply) => reply,
            Err(refused) => {
                eprintln!("{}", refused.fault().user_text(Lang::En));
                continue;
            }
        };
        let reply = stream_reply(reply, &mut std::io::stdout()).await?;
        println!();
        asked.turn.delivered(&reply).await?;
    }
}
