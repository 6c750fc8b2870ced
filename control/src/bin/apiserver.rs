//! skiff-apiserver: serves the Kubernetes API over HTTPS from the embedded store
//! (default) or etcd (--etcd-servers).

// See Cargo.toml: many small JSON allocations; mimalloc spends far less CPU on them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use skiff_control::apiserver::{self, Config};

#[derive(Parser, Debug)]
#[command(
    name = "skiff-apiserver",
    version,
    about = "skiff Kubernetes API server"
)]
struct Args {
    /// Directory for the PKI, the admin kubeconfig and the embedded store.
    #[arg(long, default_value = "/var/lib/skiff/control")]
    data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind_address: IpAddr,
    /// HTTPS port (0 picks a free one).
    #[arg(long, default_value_t = 6443)]
    secure_port: u16,
    /// Address clients use to reach this apiserver (kubeconfig, `kubernetes` Endpoints).
    #[arg(long)]
    advertise_address: Option<IpAddr>,
    /// Comma-separated etcd client URLs; without it the embedded store is used.
    #[arg(long, value_delimiter = ',')]
    etcd_servers: Vec<String>,
    /// Static bearer tokens: token,user,uid,"group1,group2" per line.
    #[arg(long)]
    token_auth_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    skiff_control::component::disable_transparent_huge_pages();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config = Config {
        data_dir: args.data_dir,
        bind: SocketAddr::new(args.bind_address, args.secure_port),
        advertise_address: args.advertise_address.unwrap_or(
            if args.bind_address.is_unspecified() {
                IpAddr::from([127, 0, 0, 1])
            } else {
                args.bind_address
            },
        ),
        etcd_servers: args.etcd_servers,
        token_auth_file: args.token_auth_file,
    };
    let backend = if config.etcd_servers.is_empty() {
        "embedded"
    } else {
        "etcd"
    };
    let running = apiserver::start(config).await?;
    // Tools (xtask up, tests) read these two lines.
    println!(
        "skiff-apiserver listening on https://{} (storage: {backend})",
        running.addr
    );
    println!("kubeconfig: {}", running.kubeconfig.display());
    tokio::select! {
        r = running.task => r??,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
