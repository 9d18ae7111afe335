# Terraform for the platform's Google Cloud side: network, GKE with Workload Identity, node pools, buckets,
# Artifact Registry, Cloud SQL for MLflow, and least-privilege service accounts bound to the Kubernetes
# ServiceAccounts the manifests use. State lives in a GCS bucket, never in git (see README.md here):
#   terraform init -backend-config="bucket=YOUR-STATE-BUCKET" -backend-config="prefix=maskrcnn/gke"
terraform {
  required_version = ">= 1.5"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }
  backend "gcs" {}
}

provider "google" {
  project = var.project_id
  region  = var.region
}
