use grapevine::AppError;

#[grapevine::service]
trait Greeter {
    async fn hello(&self, name: String) -> Result<String, AppError>;
}

async fn call(client: GreeterClient) {
    let _ = client.hello(42u32).await;
}

fn main() {
    let _ = call;
}
