//! The `mailer` command line: a thin shell over [`mailer::cli`].

fn main() -> std::process::ExitCode {
    mailer::cli::main()
}
