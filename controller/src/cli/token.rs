//! `controller token create|list|delete`.
use std::time::Duration;

use clap::{Args, Subcommand};
use fleetadm_common::clock::{parse_duration, rfc3339};
use fleetadm_common::output::{render_structured, table};
use fleetadm_proto::{CreateTokenRequest, Empty, TokenInfo, TokenRef};
use serde::Serialize;

use super::{rpc_error, DataDir, Output};
use crate::admin::client;

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a bootstrap token and print the enrollment command.
    Create(CreateArgs),
    /// List bootstrap tokens (never their secrets).
    List {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        out: Output,
    },
    /// Delete a bootstrap token by id (the part before the dot).
    Delete {
        /// Token id, e.g. abcdef.
        id: String,
        #[command(flatten)]
        data: DataDir,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    data: DataDir,
    #[command(flatten)]
    out: Output,
    /// How long the token stays valid.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    ttl: Duration,
    /// How many enrollments the token allows.
    #[arg(long, default_value_t = 1)]
    uses: u32,
    /// Free text shown in `token list`.
    #[arg(long, default_value = "")]
    description: String,
}

#[derive(Serialize)]
struct CreatedView {
    id: String,
    token: String,
    ca_hash: String,
    expires_at: String,
    uses_left: u32,
    description: String,
    command: String,
}

#[derive(Serialize)]
struct TokenView {
    id: String,
    description: String,
    created_at: String,
    expires_at: String,
    uses_left: u32,
    expired: bool,
}

fn view(t: &TokenInfo) -> TokenView {
    TokenView {
        id: t.id.clone(),
        description: t.description.clone(),
        created_at: rfc3339(t.created_at_unix),
        expires_at: rfc3339(t.expires_at_unix),
        uses_left: t.uses_left,
        expired: fleetadm_common::clock::now_unix() >= t.expires_at_unix,
    }
}

pub async fn run(cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create(a) => {
            let mut c = client::connect(&a.data.data_dir).await?;
            let t = c
                .create_token(CreateTokenRequest {
                    ttl_secs: a.ttl.as_secs(),
                    uses: a.uses,
                    description: a.description,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let v = CreatedView {
                id: t.id.clone(),
                token: t.token.clone(),
                ca_hash: t.ca_hash.clone(),
                expires_at: rfc3339(t.expires_at_unix),
                uses_left: t.uses_left,
                description: t.description.clone(),
                command: t.command.clone(),
            };
            match render_structured(&v, a.out.output) {
                Some(s) => println!("{s}"),
                None => {
                    println!("token:      {}", v.token);
                    println!("ca hash:    {}", v.ca_hash);
                    println!(
                        "expires at: {} ({} use{})",
                        v.expires_at,
                        v.uses_left,
                        if v.uses_left == 1 { "" } else { "s" }
                    );
                    println!();
                    println!("On each host, run:");
                    println!("  {}", v.command);
                }
            }
        }
        TokenCmd::List { data, out } => {
            let mut c = client::connect(&data.data_dir).await?;
            let list = c.list_tokens(Empty {}).await.map_err(rpc_error)?.into_inner();
            let views: Vec<TokenView> = list.tokens.iter().map(view).collect();
            match render_structured(&views, out.output) {
                Some(s) => println!("{s}"),
                None => {
                    let rows: Vec<Vec<String>> = views
                        .iter()
                        .map(|v| {
                            vec![
                                v.id.clone(),
                                v.expires_at.clone() + if v.expired { " (expired)" } else { "" },
                                v.uses_left.to_string(),
                                v.description.clone(),
                            ]
                        })
                        .collect();
                    print!("{}", table(&["ID", "EXPIRES", "USES LEFT", "DESCRIPTION"], &rows));
                }
            }
        }
        TokenCmd::Delete { id, data } => {
            let id = id.split('.').next().unwrap_or_default().to_string();
            let mut c = client::connect(&data.data_dir).await?;
            c.delete_token(TokenRef { id: id.clone() }).await.map_err(rpc_error)?;
            println!("token {id} deleted");
        }
    }
    Ok(())
}
