//! `ktls-setup`: placeholder home; the real tool lands with its own issue.

fn main() {
    eprintln!("ktls-setup: not implemented yet (see the project's issues)");
    std::process::exit(2);
}
