{{/*
The pod template of every node, for both job APIs: the PyTorchJob's Master and Worker replicas, and the
`node` job of the ClusterTrainingRuntime a TrainJob runs. The training-operator injects MASTER_ADDR,
PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, ... into the `pytorch` container; Kubeflow Trainer's torch
plugin injects PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK (the Job completion index), PET_MASTER_ADDR
(`<run>-node-0-0.<run>`) and PET_MASTER_PORT into the `node` container (neither into init containers).
torchrun reads the PET_* variables itself, so one command serves every node under either API; only the
container's name (userloop.trainerContainer) and, for a Job's pods, the restart policy differ.
*/}}
{{- define "userloop.podTemplate" -}}
metadata:
  labels:
    {{- include "userloop.labels" . | nindent 4 }}
  annotations:
    {{- $ann := dict
      "kubectl.kubernetes.io/default-container" (include "userloop.trainerContainer" .)
      "sidecar.istio.io/inject" "false" }}
    {{- toYaml (merge $ann (deepCopy .Values.annotations)) | nindent 4 }}
spec:
  serviceAccountName: {{ .Values.serviceAccount.name }}
  # The trainer never calls the API server.
  automountServiceAccountToken: false
  # Service links add an env var per Service in the namespace; nothing here reads them.
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ int .Values.terminationGracePeriodSeconds }}
  {{- if eq .Values.api "trainjob" }}
  # A Job's pods may only be Never or OnFailure. ExitCode is Never plus the Job's podFailurePolicy
  # (trainingruntime.yaml); the training-operator sets a PyTorchJob's pods from its replica specs itself.
  restartPolicy: {{ ternary "OnFailure" "Never" (eq .Values.restartPolicy "OnFailure") }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ int .Values.runAsUser }}
    runAsGroup: {{ int .Values.runAsUser }}
    fsGroup: {{ int .Values.runAsUser }}
    fsGroupChangePolicy: OnRootMismatch
    seccompProfile:
      type: RuntimeDefault
  {{- with .Values.priorityClass }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $gpu := gt (int (include "userloop.podGpus" .)) 0 }}
  {{- if or $gpu .Values.tolerations }}
  tolerations:
    {{- if $gpu }}
    # GPU nodes are usually tainted; the device plugin does not add this toleration for us.
    - key: nvidia.com/gpu
      operator: Exists
      effect: NoSchedule
    {{- end }}
    {{- with .Values.tolerations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- /* The rollout server of rollout.engine (values `sglang` or `vllm`, at most one enabled): one sidecar
  template for both, so probes, volumes and the GPU split cannot drift apart. */}}
  {{- $server := dict }}
  {{- if .Values.sglang.enabled }}
  {{- $server = merge (dict "name" "sglang" "module" "sglang.launch_server" "startupPath" "/health_generate"
      "alivePath" "/model_info" "urlEnv" "USERLOOP_SGLANG_URL") (deepCopy .Values.sglang) }}
  {{- else if .Values.vllm.enabled }}
  {{- $server = merge (dict "name" "vllm" "module" "vllm.entrypoints.openai.api_server" "startupPath" "/health"
      "alivePath" "/health" "urlEnv" "USERLOOP_VLLM_URL") (deepCopy .Values.vllm) }}
  {{- end }}
  {{- if $server }}
  initContainers:
    # A native sidecar (Kubernetes >= 1.29): restartPolicy Always makes this init container run beside
    # the trainer, gate it through the startup probe, and not keep the pod alive once the trainer exits,
    # so the PyTorchJob can still succeed. A plain second container would keep the pod Running forever.
    - name: {{ $server.name }}
      image: {{ $server.image }}
      imagePullPolicy: {{ .Values.imagePullPolicy }}
      restartPolicy: Always
      command: [python3, -m, {{ $server.module }}]
      args:
        {{- toYaml $server.args | nindent 8 }}
      ports:
        - name: {{ $server.name }}
          containerPort: {{ int $server.port }}
          protocol: TCP
      env:
        - name: HF_HOME
          value: {{ printf "%s/.cache/huggingface" .Values.pvc.mountPath }}
        {{- range $name, $value := $server.env }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
      resources:
        {{- include "userloop.resources" $server | nindent 8 }}
      # SGLang's /health_generate answers 503 until the model is loaded and a 1-token generation works;
      # vLLM listens only once its model is loaded and warmed up. Model download, load and CUDA-graph
      # capture take minutes, so allow startupFailureThreshold x 10 s.
      startupProbe:
        httpGet:
          path: {{ $server.startupPath }}
          port: {{ $server.name }}
        periodSeconds: 10
        timeoutSeconds: 10
        failureThreshold: {{ int $server.startupFailureThreshold }}
      # Readiness and liveness ask a route that answers from the server's own state and never waits for the
      # model: SGLang's /model_info (its /health runs a one-token generation, which queues behind a weight
      # reload and answers 503 after 20 s: a long /update_weights_from_disk would get the sidecar restarted
      # mid hand-over, tests/trainer/test_sglang_contract.py); vLLM's /health (whether the engine process is
      # alive; it does not wait on the engine loop, tests/trainer/test_vllm_engine.py). A server that hangs
      # is the trainer's to notice: its requests time out (rollout.<engine>.timeout_s) and the run stops.
      readinessProbe:
        httpGet:
          path: {{ $server.alivePath }}
          port: {{ $server.name }}
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 3
      livenessProbe:
        httpGet:
          path: {{ $server.alivePath }}
          port: {{ $server.name }}
        periodSeconds: 30
        timeoutSeconds: 10
        failureThreshold: 5
      # The documented exception to a read-only root (values.yaml `sglang`, docs/launcher.md): SGLang,
      # vLLM, flashinfer and triton JIT-compile kernels and write caches in places that differ between
      # releases (under $HOME, /tmp and some package directories), which cannot be listed for a pinned volume set.
      securityContext:
        {{- include "userloop.containerSecurityContext" (dict "readOnlyRootFilesystem" false) | nindent 8 }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        - name: weights
          mountPath: /weights
        - name: output
          mountPath: {{ .Values.pvc.mountPath }}
  {{- end }}
  containers:
    # `pytorch` for the training-operator's webhook, `node` for Kubeflow Trainer (userloop.trainerContainer).
    - name: {{ include "userloop.trainerContainer" . }}
      image: {{ .Values.image }}
      imagePullPolicy: {{ .Values.imagePullPolicy }}
      # torchrun, with the trainer's own exit code: bare torchrun answers SIGTERM with a traceback and exit 1,
      # which the ExitCode policy takes as permanent; this wrapper (trainer/torchrun.py) exits 143, retried.
      command: [python, -m, trainer.torchrun]
      # Node count, rank and rendezvous come from the PET_* variables the job's controller sets.
      args: [-m, trainer, --config, /etc/userloop/config.yaml]
      env:
        - name: USERLOOP_RUN_NAME
          value: {{ include "userloop.runName" . }}
        # How long torchrun waits for its workers' checkpoint after forwarding SIGTERM before it SIGKILLs them
        # (30 s by default, less than checkpoint.grace_s): the kubelet's own grace period bounds it instead.
        - name: TORCH_ELASTIC_SHUTDOWN_TIMEOUT
          value: {{ int .Values.terminationGracePeriodSeconds | quote }}
        # litellm downloads a price list at import unless told not to, and stalls without internet.
        - name: LITELLM_LOCAL_MODEL_COST_MAP
          value: "True"
        - name: HF_HOME
          value: {{ printf "%s/.cache/huggingface" .Values.pvc.mountPath }}
        # The root filesystem is read-only: everything else that writes caches is pointed at the `tmp`
        # emptyDir (per pod, lost on restart: kernels are recompiled, which is cheap next to a download).
        - name: HOME
          value: /tmp
        - name: XDG_CACHE_HOME
          value: /tmp/.cache
        - name: TRITON_CACHE_DIR
          value: /tmp/.cache/triton
        - name: TORCHINDUCTOR_CACHE_DIR
          value: /tmp/.cache/torchinductor
        - name: MPLCONFIGDIR
          value: /tmp/.cache/matplotlib
        {{- if $server }}
        # rollout.<engine>.url and .weights_dir default to these (resolved when the trainer starts).
        - name: {{ $server.urlEnv }}
          value: {{ printf "http://127.0.0.1:%d" (int $server.port) }}
        - name: USERLOOP_WEIGHTS_DIR
          value: /weights
        {{- end }}
        {{- if .Values.apiKeySecret.name }}
        # Only a reference: the key itself never appears in a manifest, a ConfigMap or a log.
        - name: {{ .Values.apiKeySecret.env }}
          valueFrom:
            secretKeyRef:
              name: {{ .Values.apiKeySecret.name }}
              key: {{ .Values.apiKeySecret.key }}
        {{- end }}
      resources:
        {{- include "userloop.resources" .Values.trainer | nindent 8 }}
      # Read-only root: the trainer writes only to the PVC, /tmp, /dev/shm and /weights.
      securityContext:
        {{- include "userloop.containerSecurityContext" (dict "readOnlyRootFilesystem" true) | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/userloop
          readOnly: true
        - name: tmp
          mountPath: /tmp
        - name: dshm
          mountPath: /dev/shm
        {{- if $server }}
        - name: weights
          mountPath: /weights
        {{- end }}
        - name: output
          mountPath: {{ .Values.pvc.mountPath }}
  volumes:
    - name: config
      configMap:
        name: {{ include "userloop.configMapName" . }}
    # The trainer's only scratch space besides the PVC (root is read-only): /tmp and the kernel caches.
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmpSize }}
    # NCCL and data loaders need more than the container runtime's 64 MiB default /dev/shm.
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.shmSize }}
    {{- if $server }}
    # Trainer and sidecar hold disjoint GPUs (no CUDA IPC): new weights and LoRA adapters go through RAM.
    - name: weights
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.weightsSize }}
    {{- end }}
    - name: output
      persistentVolumeClaim:
        claimName: {{ .Values.pvc.name }}
{{- end -}}
