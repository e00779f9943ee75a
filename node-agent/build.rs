//! Bake the git revision into `--version`.
include!("../common/git_rev.rs");

fn main() {
    emit_git_rev();
}
