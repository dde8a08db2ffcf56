//! `weir plugin push|list|activate|rollback`: plugin versions through a worker's API.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::config::plugin_name_of;

/// Where a worker's API is, and the token to send.
#[derive(Args)]
pub(super) struct ApiArgs {
    /// The worker's API.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:8080",
        env = "WEIR_API"
    )]
    pub(super) api: String,
    /// The admin token [default: the WEIR_ADMIN_TOKEN environment variable].
    #[arg(long, global = true)]
    pub(super) token: Option<String>,
}

#[derive(Args)]
pub(super) struct PluginArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Upload a component as the next version of a plugin.
    Push {
        /// The component (.wasm).
        file: PathBuf,
        /// The plugin's name [default: the file name without .wasm].
        #[arg(long)]
        name: Option<String>,
    },
    /// List every plugin and version.
    List,
    /// Make a version the active one (every worker running the plugin swaps it in), or with
    /// --canary, give it a share of the records while it is watched.
    Activate {
        name: String,
        version: u64,
        /// Percent of the records (by a stable hash of their ids) for the version, as a
        /// canary rolled back automatically when it fails more than the active one.
        #[arg(long, value_name = "PERCENT")]
        canary: Option<f64>,
    },
    /// Make the previously active version active again.
    Rollback { name: String },
}

/// `weir plugin ...`: blocking HTTP calls, off the async runtime.
impl PluginArgs {
    pub async fn execute(self) -> anyhow::Result<()> {
        use super::client::{self, Client};
        tokio::task::spawn_blocking(move || {
            let client = Client::new(&self.api.api, self.api.token)?;
            match self.command {
                PluginCommand::Push { file, name } => {
                    let name = name.unwrap_or_else(|| plugin_name_of(&file));
                    client::push(&client, &file, &name)
                }
                PluginCommand::List => client::list(&client),
                PluginCommand::Activate {
                    name,
                    version,
                    canary,
                } => client::activate(&client, &name, version, canary),
                PluginCommand::Rollback { name } => client::rollback(&client, &name),
            }
        })
        .await?
    }
}
