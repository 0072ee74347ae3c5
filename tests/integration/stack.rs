//! The local stack of `make up`: all four services answer on their ports.

use aws_sdk_s3::primitives::ByteStream;
use diesel::{Connection, RunQueryDsl};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::time::Duration;

use crate::helpers::{admin_db_url, brokers, default_config};

#[test]
fn postgres_answers_as_the_txnflow_role_which_may_create_databases() {
    let mut connection = diesel::pg::PgConnection::establish(&admin_db_url()).unwrap();
    let rows =
        crate::helpers::query_json(&mut connection, "SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user");
    assert_eq!(rows, [serde_json::json!({"rolcreatedb": true})]);
    diesel::sql_query("SELECT 1").execute(&mut connection).unwrap();
}

#[test]
fn the_broker_has_the_pipeline_topics() {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    let partitions = |name: &str| metadata.topics().iter().find(|t| t.name() == name).map(|t| t.partitions().len());
    assert_eq!(partitions("transactions"), Some(3));
    assert_eq!(partitions("failed-transactions"), Some(1));
}

#[tokio::test]
async fn s3_stores_and_returns_an_object_in_the_pipeline_bucket() {
    let config = default_config();
    let client = txnflow::batch::s3::client(&config.s3);
    txnflow::batch::s3::ensure_bucket(&client, &config.s3.bucket).await.unwrap();
    let key = format!("tests/{}.csv", uuid::Uuid::new_v4());
    client
        .put_object()
        .bucket(&config.s3.bucket)
        .key(&key)
        .body(ByteStream::from_static(b"id;x\n1;2\n"))
        .send()
        .await
        .unwrap();
    let object = client.get_object().bucket(&config.s3.bucket).key(&key).send().await.unwrap();
    assert_eq!(object.body.collect().await.unwrap().into_bytes().as_ref(), b"id;x\n1;2\n");
    client.delete_object().bucket(&config.s3.bucket).key(&key).send().await.unwrap();
}

#[tokio::test]
async fn the_stack_ml_api_answers_on_port_8000() {
    let health: serde_json::Value = reqwest::get("http://127.0.0.1:8000/health").await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");
}
