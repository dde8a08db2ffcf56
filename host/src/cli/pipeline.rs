//! `weir pipeline status`: the running plugin version, any canary, and fates per version,
//! through a worker's API.

use clap::{Args, Subcommand};

use super::plugin::ApiArgs;

#[derive(Args)]
pub(super) struct PipelineArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: PipelineCommand,
}

#[derive(Subcommand)]
enum PipelineCommand {
    /// The running plugin version, any canary, and record fates per version.
    Status {
        /// Print the API's JSON instead.
        #[arg(long)]
        json: bool,
    },
}

/// Blocking HTTP calls, off the async runtime.
impl PipelineArgs {
    pub async fn execute(self) -> anyhow::Result<()> {
        use super::client::{self, Client};
        tokio::task::spawn_blocking(move || {
            let client = Client::new(&self.api.api, self.api.token)?;
            match self.command {
                PipelineCommand::Status { json } => client::status(&client, json),
            }
        })
        .await?
    }
}
