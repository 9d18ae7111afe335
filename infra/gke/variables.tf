variable "project_id" {
  description = "The Google Cloud project (the manifests' PROJECT)."
  type        = string
}

variable "region" {
  description = "Region of the cluster, buckets, registry and database (the manifests' REGION)."
  type        = string
  default     = "us-central1"
}

variable "node_zones" {
  description = "Zones of the node pools (L4 GPUs exist in us-central1-a, -b and -c)."
  type        = list(string)
  default     = ["us-central1-a", "us-central1-b"]
}

variable "name" {
  description = "Prefix of every resource's name."
  type        = string
  default     = "maskrcnn"
}

variable "cpu_machine_type" {
  description = "CPU pool: system pods, MLflow, KFP, the Ray head and the predictors (2 CPU, 6 GiB each)."
  type        = string
  default     = "n2-standard-8"
}

variable "cpu_max_nodes" {
  description = "CPU pool's autoscaling ceiling per zone."
  type        = number
  default     = 6
}

variable "gpu_machine_type" {
  description = "GPU pool's machine type (g2 carries NVIDIA L4)."
  type        = string
  default     = "g2-standard-8"
}

variable "gpu_type" {
  description = "GPU pool's accelerator: must equal ray/raycluster.yaml's cloud.google.com/gke-accelerator selector."
  type        = string
  default     = "nvidia-l4"
}

variable "gpu_max_nodes" {
  description = "GPU pool's autoscaling ceiling per zone (it scales from 0: no GPU is paid for while idle)."
  type        = number
  default     = 2
}

variable "master_authorized_cidrs" {
  description = "CIDR blocks allowed to reach the cluster's API server (your VPN or CI runners)."
  type        = list(string)
  default     = []
}

variable "kubeflow_pipeline_service_accounts" {
  description = "Kubernetes ServiceAccounts the pipeline steps run as (namespace/name): standalone KFP's pipeline-runner, the multi-user profile's default-editor (deployment/overlays/kubeflow-multi-user), and the retraining trigger (deployment/retrain)."
  type        = list(string)
  default     = ["kubeflow/pipeline-runner", "kubeflow-user-example-com/default-editor", "kubeflow/maskrcnn-retrain"]
}

variable "sql_tier" {
  description = "Cloud SQL machine tier for MLflow's PostgreSQL."
  type        = string
  default     = "db-custom-2-7680"
}

variable "kms_key" {
  description = "Cloud KMS key (projects/.../cryptoKeys/...) that encrypts the buckets; empty: Google-managed keys."
  type        = string
  default     = ""
}

variable "github_repository" {
  description = "owner/name of the GitHub repository whose version tags may release (Workload Identity Federation)."
  type        = string
  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", var.github_repository))
    error_message = "github_repository must be owner/name."
  }
}

variable "binauthz_allowed_images" {
  description = "Image name patterns Binary Authorization admits without the release's attestation: the third-party components the platform runs beside its own images (Google's system images are exempt already). Narrow it to the versions you install."
  type        = list(string)
  default = [
    "gcr.io/knative-releases/*",            # Knative Serving (KServe's Knative mode)
    "docker.io/kserve/*",                   # KServe's controller, storage initializer, agent
    "gcr.io/ml-pipeline/*",                 # Kubeflow Pipelines
    "ghcr.io/kubeflow/*",                   # Kubeflow Pipelines (newer releases)
    "quay.io/kuberay/*",                    # the KubeRay operator
    "gcr.io/gke-release/*",                 # GKE add-ons not covered by the global exemption
  ]
}
