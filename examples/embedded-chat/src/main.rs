//! `cargo run -p wse-example-embedded-chat -- --listen 127.0.0.1:5007 --cores 2`
//!
//! Serves the chat of `examples/README.md` with the engine embedded. Prints one line,
//! `embedded-chat ready ws=ADDR`, once it accepts connections; Ctrl-C ends it.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;

use clap::Parser;

#[derive(Parser)]
#[command(about = "A chat backend with the wse-server engine embedded")]
struct Args {
    /// WebSocket address (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:5007")]
    listen: SocketAddr,
    /// Shards (one per core).
    #[arg(long, default_value_t = 2)]
    cores: usize,
}

fn main() {
    let args = Args::parse();
    let server = match wse_example_embedded_chat::start(args.listen, args.cores) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("embedded-chat: {e}");
            std::process::exit(1);
        }
    };
    println!("embedded-chat ready ws={}", server.local_addr());
    // Ctrl-C's default action ends the process; the clients see the connection drop and
    // reconnect elsewhere. A production backend would `drain` first (see wse-server's main).
    wse_example_embedded_chat::serve(&server, &AtomicBool::new(false));
}
