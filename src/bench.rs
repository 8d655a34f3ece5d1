//! Placeholder: the load tool is being written (see BENCH.md).

/// `runq bench` settings.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("runq bench is not built yet")
}
