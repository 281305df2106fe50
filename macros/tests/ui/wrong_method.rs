use grapevine::AppError;

#[grapevine::service]
trait Greeter {
    async fn hello(&self, name: String) -> Result<String, AppError>;
}

async fn call(client: GreeterClient) {
    let _ = client.goodbye("Ada".to_string()).await;
}

fn main() {
    let _ = call;
}
