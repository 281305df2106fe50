#[grapevine::service]
trait Greeter {
    fn hello(&self, name: String) -> Result<String, grapevine::AppError>;
}

fn main() {}
