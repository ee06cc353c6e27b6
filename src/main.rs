use clap::Parser;

mod cli;

fn main() {
    let cli = cli::Cli::parse();
    let code = match cli::run(cli) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}
