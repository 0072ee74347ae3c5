//! S3 adapter: a client for any S3-compatible endpoint (SeaweedFS locally,
//! MinIO in compose, AWS), with credentials from our own configuration.

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region};

use crate::config::S3Config;

/// A path-style client (`http://host/bucket/key`), which SeaweedFS and MinIO need.
pub fn client(s3: &S3Config) -> Client {
    let credentials = Credentials::new(&s3.access_key, &s3.secret_key, None, None, "txnflow-config");
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .endpoint_url(&s3.endpoint)
        .region(Region::new(s3.region.clone()))
        .credentials_provider(credentials)
        .force_path_style(true)
        // Checksums only where S3 requires them: the SDK's default trailer
        // checksums on streamed uploads are refused by SeaweedFS (and older
        // MinIO) as InvalidAccessKeyId.
        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
        .build();
    Client::from_conf(config)
}

/// Creates `bucket` unless it exists already.
pub async fn ensure_bucket(client: &Client, bucket: &str) -> anyhow::Result<()> {
    if client.head_bucket().bucket(bucket).send().await.is_ok() {
        return Ok(());
    }
    match client.create_bucket().bucket(bucket).send().await {
        Ok(_) => Ok(()),
        Err(error) => {
            let service_error = error.into_service_error();
            if service_error.is_bucket_already_owned_by_you() || service_error.is_bucket_already_exists() {
                Ok(())
            } else {
                Err(anyhow::anyhow!("cannot create bucket {bucket}: {service_error}"))
            }
        }
    }
}
